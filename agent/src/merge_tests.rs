//! Tests of the merge (`merge.rs`): property test against the source
//! tree, unit writes, hole punching and where the fingerprints live.

use super::*;
use crate::throttle::{Bandwidth, Throttle};
use proptest::prelude::*;

/// Path, kind, content (or link target), (mode, mtime, mtime ns).
type Listing = Vec<(PathBuf, String, Vec<u8>, (u32, i64, u32))>;

fn tree(root: &Path) -> Listing {
    let mut v = Vec::new();
    let mut e = Vec::new();
    walk(root, Path::new(""), &|_| false, &|_| false, &mut e).unwrap();
    for x in e {
        let p = root.join(&x.rel);
        let (kind, data) = match &x.source {
            Source::Dir => ("dir".to_string(), vec![]),
            Source::Symlink(t) => ("link".to_string(), t.to_string_lossy().as_bytes().to_vec()),
            _ => ("file".to_string(), std::fs::read(&p).unwrap()),
        };
        // Owner, mode and mtime too (not for links: lutimes is not
        // applied to the source's links by these ops anyway).
        let meta = if kind == "link" {
            (0, 0, 0)
        } else {
            (x.meta.mode, x.meta.mtime, x.meta.mtime_ns)
        };
        v.push((x.rel, kind, data, meta));
    }
    v.sort();
    v
}

/// The host's copy of a test stage's fingerprints (beside the stage).
fn host_fp(stage: &Path) -> PathBuf {
    stage.with_extension("fp")
}

fn run_merge(src: &Path, stage: &Path, bs: u32) -> MergeStats {
    let mut e = vec![Entry {
        rel: "files".into(),
        source: Source::Dir,
        meta: Meta::of(&std::fs::metadata(src).unwrap()),
    }];
    walk(src, Path::new("files"), &|_| false, &|_| false, &mut e).unwrap();
    let mut t = Throttle::new(Bandwidth::default());
    Merger::new(stage.to_path_buf(), host_fp(stage), bs, &mut t, None)
        .merge(e, &mut || Ok(Vec::new()))
        .unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        file: u8,
        off: u32,
        len: u16,
        byte: u8,
    },
    Truncate {
        file: u8,
        len: u32,
    },
    Remove {
        file: u8,
    },
    Dir {
        file: u8,
    },
    Link {
        file: u8,
    },
    Chmod {
        file: u8,
        mode: u16,
    },
    /// Between runs: a run cut half way (the marker left, garbage
    /// written), or damaged fingerprints.
    Cut {
        file: u8,
        byte: u8,
    },
    Damage,
    /// The host lost its copy of the fingerprints.
    Lost,
    /// The host's copy is an older run's (the first round's).
    Stale,
    /// The directory d0 becomes a symlink (to a canary directory
    /// outside both trees, whose files must survive) or a file.
    DirReplaced {
        link: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, 0u32..40000, 1u16..20000, any::<u8>()).prop_map(|(file, off, len, byte)| Op::Write { file, off, len, byte }),
        1 => (0u8..6, 0u32..40000).prop_map(|(file, len)| Op::Truncate { file, len }),
        1 => (0u8..6).prop_map(|file| Op::Remove { file }),
        1 => (0u8..6).prop_map(|file| Op::Dir { file }),
        1 => (0u8..6).prop_map(|file| Op::Link { file }),
        1 => (0u8..6, 0u16..0o777).prop_map(|(file, mode)| Op::Chmod { file, mode }),
        1 => (0u8..6, any::<u8>()).prop_map(|(file, byte)| Op::Cut { file, byte }),
        1 => Just(Op::Damage),
        1 => Just(Op::Lost),
        1 => Just(Op::Stale),
        1 => any::<bool>().prop_map(|link| Op::DirReplaced { link }),
    ]
}

fn name(f: u8) -> String {
    // Some nested: a directory op on "d0" makes the others children.
    if f.is_multiple_of(3) {
        format!("f{f}")
    } else {
        format!("d0/f{f}")
    }
}

fn apply(src: &Path, stage: &Path, op: &Op) {
    use std::os::unix::fs::PermissionsExt;
    let p = |f: u8| src.join(name(f));
    // Operations on a path below d0 while d0 is a symlink would act on
    // the canary: those that do not rebuild d0 first are skipped.
    let under_link = |f: u8| {
        name(f).starts_with("d0/")
            && src
                .join("d0")
                .symlink_metadata()
                .map(|m| !m.is_dir())
                .unwrap_or(true)
    };
    match *op {
        Op::Truncate { file, .. } | Op::Remove { file } | Op::Chmod { file, .. }
            if under_link(file) =>
        {
            return
        }
        _ => {}
    }
    let ensure_parent = |q: &Path| {
        let parent = q.parent().unwrap();
        if parent
            .symlink_metadata()
            .map(|m| !m.is_dir())
            .unwrap_or(false)
        {
            remove(parent).unwrap();
        }
        std::fs::create_dir_all(parent).unwrap();
    };
    match *op {
        Op::Write {
            file,
            off,
            len,
            byte,
        } => {
            let q = p(file);
            ensure_parent(&q);
            if q.symlink_metadata().map(|m| !m.is_file()).unwrap_or(false) {
                remove(&q).unwrap();
            }
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&q)
                .unwrap();
            f.write_all_at(&vec![byte; len as usize], off as u64)
                .unwrap();
        }
        Op::Truncate { file, len } => {
            if let Ok(f) = OpenOptions::new().write(true).open(p(file)) {
                if f.metadata().unwrap().is_file() {
                    f.set_len(len as u64).unwrap();
                }
            }
        }
        Op::Remove { file } => remove(&p(file)).unwrap(),
        Op::Dir { file } => {
            let q = src.join(if file % 2 == 0 {
                "d0".to_string()
            } else {
                name(file)
            });
            ensure_parent(&q);
            if q.symlink_metadata().map(|m| !m.is_dir()).unwrap_or(true) {
                remove(&q).unwrap();
                std::fs::create_dir(&q).unwrap();
            }
        }
        Op::Link { file } => {
            let q = p(file);
            ensure_parent(&q);
            remove(&q).unwrap();
            std::os::unix::fs::symlink(format!("target-{file}"), &q).unwrap();
        }
        Op::Chmod { file, mode } => {
            let q = p(file);
            if q.symlink_metadata().map(|m| m.is_file()).unwrap_or(false) {
                std::fs::set_permissions(&q, std::fs::Permissions::from_mode(mode as u32 | 0o600))
                    .unwrap();
            }
        }
        Op::Cut { file, byte } => {
            let md = stage.join(META_DIR);
            std::fs::create_dir_all(&md).unwrap();
            std::fs::write(md.join(MARKER), b"x").unwrap();
            let q = stage.join("files").join(name(file));
            if q.symlink_metadata().map(|m| m.is_file()).unwrap_or(false) {
                let f = OpenOptions::new().write(true).open(&q).unwrap();
                f.write_all_at(&[byte; 100], 10).unwrap();
            }
        }
        Op::DirReplaced { link } => {
            let d0 = src.join("d0");
            remove(&d0).unwrap();
            if link {
                let canary = src.parent().unwrap().join("canary");
                std::os::unix::fs::symlink(&canary, &d0).unwrap();
            } else {
                std::fs::write(&d0, b"now a file").unwrap();
            }
        }
        Op::Lost => {
            let _ = std::fs::remove_file(host_fp(stage));
        }
        Op::Stale => {
            // The host's copy from the run before the last one.
            let old = stage.with_extension("older");
            if old.exists() {
                std::fs::copy(&old, host_fp(stage)).unwrap();
            }
        }
        Op::Damage => {
            let fp = host_fp(stage);
            if let Ok(mut b) = std::fs::read(&fp) {
                let n = b.len();
                b[n / 2] ^= 0x55;
                std::fs::write(&fp, b).unwrap();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every merge the stage's tree equals the source's, whatever
    /// happened between runs (cut runs, damaged fingerprints), and an
    /// unchanged source writes nothing.
    #[test]
    fn merge_matches_source(ops in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..6), small in any::<bool>()) {
        let d = tempfile::tempdir().unwrap();
        let (src, stage) = (d.path().join("src"), d.path().join("stage"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&stage).unwrap();
        let bs = if small { 512 } else { 8192 };
        let canary = d.path().join("canary");
        std::fs::create_dir_all(canary.join("sub")).unwrap();
        std::fs::write(canary.join("keep.txt"), b"keep").unwrap();
        let canary_tree = tree(&canary);
        for round in &ops {
            for o in round {
                apply(&src, &stage, o);
            }
            run_merge(&src, &stage, bs);
            prop_assert_eq!(tree(&src), tree(&stage.join("files")));
            prop_assert_eq!(&tree(&canary), &canary_tree);
            let again = run_merge(&src, &stage, bs);
            prop_assert_eq!(again.bytes_written, 0);
            prop_assert_eq!(&again.fingerprints, "trusted");
            let older = stage.with_extension("older");
            if !older.exists() {
                std::fs::copy(host_fp(&stage), older).unwrap();
            }
        }
    }
}

#[test]
fn a_changed_block_rewrites_only_the_units_that_differ() {
    let d = tempfile::tempdir().unwrap();
    let (src, stage) = (d.path().join("src"), d.path().join("stage"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&stage).unwrap();
    let mut page: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("f"), &page).unwrap();
    run_merge(&src, &stage, 8192);
    // The second 4 KiB of the second 8 KiB block, and one byte of the
    // fifth block's first unit.
    page[12288..16384].fill(0xaa);
    page[32768] ^= 1;
    std::fs::write(src.join("f"), &page).unwrap();
    let st = run_merge(&src, &stage, 8192);
    assert_eq!(st.changed_blocks, 2);
    assert_eq!(st.bytes_written, 8192);
    assert_eq!(std::fs::read(stage.join("files/f")).unwrap(), page);
    // Growing: the new tail is written whole.
    page.extend_from_slice(&[3; 8192]);
    std::fs::write(src.join("f"), &page).unwrap();
    assert_eq!(run_merge(&src, &stage, 8192).bytes_written, 8192);
    assert_eq!(std::fs::read(stage.join("files/f")).unwrap(), page);
    // Units that became zeros are punched out, not written.
    let blocks = |p: &Path| std::fs::metadata(p).unwrap().blocks();
    let before = blocks(&stage.join("files/f"));
    page[16384..49152].fill(0);
    page[50000] = 1;
    std::fs::write(src.join("f"), &page).unwrap();
    let st = run_merge(&src, &stage, 8192);
    assert_eq!((st.bytes_punched, st.bytes_written), (32768, 4096));
    assert_eq!(std::fs::read(stage.join("files/f")).unwrap(), page);
    assert_eq!(blocks(&stage.join("files/f")), before - 64);
}

#[test]
fn fingerprints_live_on_the_host_and_a_stage_of_the_old_layout_is_read() {
    let d = tempfile::tempdir().unwrap();
    let (src, stage) = (d.path().join("src"), d.path().join("stage"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(src.join("f"), vec![9u8; 20000]).unwrap();
    run_merge(&src, &stage, 8192);
    let meta = stage.join(META_DIR);
    assert!(!meta.join(FINGERPRINTS).exists());
    assert_eq!(
        std::fs::metadata(meta.join(FINGERPRINTS_ID)).unwrap().len(),
        8 + 32 + 32
    );
    assert_eq!(run_merge(&src, &stage, 8192).fingerprints, "trusted");
    // The previous layout: the fingerprints on the stage, no id.
    std::fs::rename(host_fp(&stage), meta.join(FINGERPRINTS)).unwrap();
    std::fs::remove_file(meta.join(FINGERPRINTS_ID)).unwrap();
    assert_eq!(run_merge(&src, &stage, 8192).fingerprints, "trusted");
    assert!(!meta.join(FINGERPRINTS).exists() && host_fp(&stage).exists());
    // Another host (no copy here) or another run's copy: not trusted.
    std::fs::remove_file(host_fp(&stage)).unwrap();
    let st = run_merge(&src, &stage, 8192);
    assert!(
        st.fingerprints.contains("not on this host"),
        "{}",
        st.fingerprints
    );
    let mine = std::fs::read(host_fp(&stage)).unwrap();
    std::fs::write(src.join("f"), vec![8u8; 20000]).unwrap();
    run_merge(&src, &stage, 8192);
    std::fs::write(host_fp(&stage), mine).unwrap();
    std::fs::write(src.join("f"), vec![7u8; 20000]).unwrap();
    let st = run_merge(&src, &stage, 8192);
    assert!(
        st.fingerprints.contains("not the last run's"),
        "{}",
        st.fingerprints
    );
    assert_eq!(
        std::fs::read(stage.join("files/f")).unwrap(),
        vec![7u8; 20000]
    );
}

#[test]
fn fingerprint_file_rejects_damage() {
    let rec = Record {
        kind: K_FILE,
        meta: Meta::default(),
        size: 3,
        link: vec![],
        hashes: vec![[7; 16]],
    };
    let b = encode(4096, &[(PathBuf::from("a/b"), rec)]);
    assert_eq!(decode(&b).unwrap(), (4096, 1));
    for cut in 0..b.len() {
        assert!(decode(&b[..cut]).is_err());
    }
    let mut bad = b.clone();
    bad[20] ^= 1;
    assert!(decode(&bad).is_err());
}
