//! `cdmfs`: format, check and use a pool offline (before or without the daemon).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cdm_common::size::{human, parse_size};
use cdmfs::{FileDev, FormatOptions, Pool, Target};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdmfs",
    version,
    about = "cdm pool engine tool: format, check and use a pool offline"
)]
struct Cli {
    /// Pool file or block device.
    #[arg(
        short,
        long,
        env = "CDMFS_POOL",
        global = true,
        default_value = "./cdm-data/pool"
    )]
    pool: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Key file for encrypted volumes (32 random bytes or 64 hex digits).
    #[arg(long, env = "CDMFS_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an empty pool (a sparse file of --size, or a whole block device).
    Format {
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Overwrite an existing pool.
        #[arg(long)]
        force: bool,
    },
    /// Check structure, checksums of metadata, reference counts and space accounting.
    Fsck,
    /// Read every node and data extent and verify its checksum.
    Scrub,
    /// Pool space.
    Space,
    #[command(subcommand)]
    Volume(VolumeCmd),
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Make a writable volume from a snapshot: clone VOLUME@SNAPSHOT NAME.
    Clone { snapshot: String, name: String },
    /// Write bytes of a volume or snapshot (VOLUME or VOLUME@ID) to stdout.
    Cat {
        export: String,
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        /// Bytes to read (default: to the end).
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
    },
    /// Hex dump a byte range; with --map, the physical layout instead.
    Dump {
        export: String,
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        #[arg(long, default_value = "512", value_parser = parse_size)]
        length: u64,
        #[arg(long)]
        map: bool,
    },
    /// Mount the FUSE view of the pool at DIR (volumes/NAME/disk read-write,
    /// snapshots/VOLUME/ID/disk read-only) until SIGINT/SIGTERM; runs
    /// cdm-fuse, installed next to cdmfs.
    Mount { dir: PathBuf },
    /// Write a file (or stdin) into a volume at --offset.
    Write {
        volume: String,
        /// Input file; stdin when absent or "-".
        file: Option<PathBuf>,
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume (stage disk).
    Create {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// 4K to 1M, a power of two.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u64,
        /// Deduplicate blocks (blake3 fingerprints, pool-wide index).
        #[arg(long)]
        dedup: bool,
        /// zstd level 1 (fastest) … 8 (balanced) … 29 (smallest); 0 = off.
        #[arg(long, default_value = "0")]
        compression: u8,
        /// aes-256-xts, aes-128-xts or sm4-xts (needs --key-file).
        #[arg(long)]
        encryption: Option<String>,
    },
    List,
    /// Grow a volume to --size.
    Grow {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume (with --force, its snapshots too).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    Create {
        volume: String,
        #[arg(long, default_value = "")]
        label: String,
        /// JSON object stored with the snapshot.
        #[arg(long)]
        metadata: Option<String>,
    },
    List {
        volume: Option<String>,
    },
    /// Delete VOLUME@ID (or a bare ID).
    Delete {
        snapshot: String,
    },
}

fn open_pool(path: &Path, key_file: Option<&Path>) -> Result<Pool> {
    Pool::open_file(path, key_file).with_context(|| format!("cannot open pool {}", path.display()))
}

fn snapshot_id(pool: &Pool, s: &str) -> Result<u64> {
    if s.contains('@') {
        match pool.resolve(s)? {
            Target::Snapshot(id) => Ok(id),
            Target::Volume(_) => bail!("{s} is not a snapshot"),
        }
    } else {
        s.parse().with_context(|| format!("bad snapshot id {s:?}"))
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (d, s) = (secs / 86400, secs % 86400);
    // days since 1970-01-01 -> civil date (Howard Hinnant's algorithm)
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn run(cli: Cli) -> Result<ExitCode> {
    let path = &cli.pool;
    let key = cli.key_file.as_deref();
    let json = cli.json;
    match cli.cmd {
        Cmd::Format { size, force } => format(path, size, force)?,
        Cmd::Mount { dir } => {
            let exe = std::env::current_exe()?.with_file_name("cdm-fuse");
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--pool").arg(path).arg(&dir);
            if let Some(k) = &cli.key_file {
                cmd.arg("--key-file").arg(k);
            }
            use std::os::unix::process::CommandExt;
            let e = cmd.exec();
            anyhow::bail!("cannot run {}: {e}", exe.display());
        }
        Cmd::Fsck => return fsck(&open_pool(path, key)?, json),
        Cmd::Scrub => return scrub(&open_pool(path, key)?, json),
        Cmd::Space => space(&open_pool(path, key)?, json)?,
        Cmd::Volume(v) => volume(open_pool(path, key)?, v, json)?,
        Cmd::Snapshot(s) => snapshot(open_pool(path, key)?, s, json)?,
        Cmd::Clone { snapshot, name } => {
            let pool = open_pool(path, key)?;
            let id = snapshot_id(&pool, &snapshot)?;
            let info = pool.clone_snapshot(id, &name)?;
            pool.close()?;
            if json {
                print_json(&info)?;
            } else {
                println!("created clone {} of snapshot {id}", info.name);
            }
        }
        Cmd::Cat {
            export,
            offset,
            length,
        } => cat(&open_pool(path, key)?, &export, offset, length)?,
        Cmd::Dump {
            export,
            offset,
            length,
            map,
        } => dump(&open_pool(path, key)?, &export, offset, length, map, json)?,
        Cmd::Write {
            volume,
            file,
            offset,
        } => write(open_pool(path, key)?, &volume, file.as_deref(), offset)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `cdmfs format`.
fn format(path: &Path, size: Option<u64>, force: bool) -> Result<()> {
    if path.exists() && !force {
        if let Ok(p) = open_pool(path, None) {
            drop(p);
            bail!(
                "{} already holds a pool; use --force to overwrite it",
                path.display()
            );
        }
    }
    let dev = match size {
        Some(s) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            FileDev::create(path, s)?
        }
        None => FileDev::open(path)
            .with_context(|| format!("{} does not exist: give --size", path.display()))?,
    };
    Pool::format(&dev, &FormatOptions::default())?;
    println!(
        "formatted {} ({})",
        path.display(),
        human(cdmfs::BlockDev::len(&dev)?)
    );
    Ok(())
}

/// `cdmfs fsck`: exit status 1 if the pool is not clean.
fn fsck(pool: &Pool, json: bool) -> Result<ExitCode> {
    let rep = pool.fsck()?;
    if json {
        print_json(&rep)?;
    } else {
        println!(
            "{} volumes, {} snapshots, {} extents ({} data), metadata {} ({} volume-tree, {} refcount, {} catalog, {} dedup-index nodes)",
            rep.volumes,
            rep.snapshots,
            rep.extents,
            human(rep.data_bytes),
            human(rep.metadata_bytes()),
            rep.volume_nodes,
            rep.refcount_nodes,
            rep.catalog_nodes,
            rep.dedup_nodes
        );
        for e in &rep.errors {
            println!("ERROR: {e}");
        }
        println!("{}", if rep.is_clean() { "clean" } else { "NOT CLEAN" });
    }
    Ok(if rep.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `cdmfs scrub`: exit status 1 if anything is bad.
fn scrub(pool: &Pool, json: bool) -> Result<ExitCode> {
    let rep = pool.scrub()?;
    if json {
        print_json(&rep)?;
    } else {
        println!(
            "{} nodes, {} extents, {} verified",
            rep.nodes_checked,
            rep.extents_checked,
            human(rep.bytes_checked)
        );
        for e in &rep.errors {
            println!(
                "BAD: {} offset {} (pool block {}): {}",
                e.target, e.offset, e.pool_block, e.what
            );
        }
        println!("{} error(s)", rep.errors.len());
    }
    Ok(if rep.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `cdmfs space`: space and data reduction.
fn space(pool: &Pool, json: bool) -> Result<()> {
    let s = pool.space()?;
    let r = pool.reduction()?;
    if json {
        print_json(&serde_json::json!({"space": s, "reduction": r}))?;
    } else {
        println!(
            "total {}  used {}  free {}  generation {}",
            human(s.total_bytes),
            human(s.used_bytes),
            human(s.free_bytes),
            s.generation
        );
        let line = |name: &str, b: &cdmfs::Reduction| {
            println!(
                "{name:<24} {:>10} {:>12} {:>18} {:>7.2}x",
                human(b.logical_bytes),
                human(b.after_dedup_bytes),
                human(b.after_compression_bytes),
                b.ratio()
            )
        };
        println!(
            "{:<24} {:>10} {:>12} {:>18} {:>8}",
            "", "LOGICAL", "AFTER DEDUP", "AFTER COMPRESSION", "RATIO"
        );
        line("pool (volumes+snapshots)", &r.pool);
        for v in &r.volumes {
            line(&v.name, &v.bytes);
        }
    }
    Ok(())
}

/// `cdmfs volume ...`.
fn volume(pool: Pool, cmd: VolumeCmd, json: bool) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            block_size,
            dedup,
            compression,
            encryption,
        } => {
            let bs = u32::try_from(block_size).context("block size too large")?;
            let policy = cdmfs::DataPolicy {
                dedup,
                compression,
                encryption: encryption
                    .as_deref()
                    .map(cdmfs::Cipher::parse)
                    .transpose()?,
            };
            let info = pool.create_volume_with(&name, size, bs, policy)?;
            pool.close()?;
            if json {
                print_json(&info)?;
            } else {
                println!(
                    "created volume {} ({}, {} blocks)",
                    info.name,
                    human(info.size),
                    human(info.block_size as u64)
                );
            }
        }
        VolumeCmd::List => {
            let list = pool.list_volumes()?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<24} {:>12} {:>8} {:>12} {:>12} {:>5} {:<10} {:<26} CREATED",
                    "NAME", "SIZE", "BLOCK", "ALLOCATED", "UNIQUE", "SNAPS", "ORIGIN", "PIPELINE"
                );
                for v in list {
                    println!(
                        "{:<24} {:>12} {:>8} {:>12} {:>12} {:>5} {:<10} {:<26} {}",
                        v.name,
                        human(v.size),
                        human(v.block_size as u64),
                        human(v.allocated_bytes),
                        human(v.unique_bytes),
                        v.snapshots,
                        v.origin
                            .map(|o| o.to_string())
                            .unwrap_or_else(|| "-".into()),
                        v.policy.to_string(),
                        time(v.created_ns)
                    );
                }
            }
        }
        VolumeCmd::Grow { name, size } => {
            let info = pool.grow_volume(&name, size)?;
            pool.close()?;
            println!("volume {} is now {}", info.name, human(info.size));
        }
        VolumeCmd::Delete { name, force } => {
            pool.delete_volume(&name, force)?;
            pool.close()?;
            println!("deleted volume {name}");
        }
    }
    Ok(())
}

/// `cdmfs snapshot ...`.
fn snapshot(pool: Pool, cmd: SnapshotCmd, json: bool) -> Result<()> {
    match cmd {
        SnapshotCmd::Create {
            volume,
            label,
            metadata,
        } => {
            let meta = match metadata {
                Some(m) => serde_json::from_str(&m).context("--metadata is not valid JSON")?,
                None => serde_json::Value::Null,
            };
            let info = pool.create_snapshot(&volume, &label, meta)?;
            pool.close()?;
            if json {
                print_json(&info)?;
            } else {
                println!("created snapshot {}@{}", info.volume, info.id);
            }
        }
        SnapshotCmd::List { volume } => {
            let list = pool.list_snapshots(volume.as_deref())?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<30} {:<20} {:>12} {:>12} {:<20} METADATA",
                    "SNAPSHOT", "LABEL", "ALLOCATED", "UNIQUE", "CREATED"
                );
                for s in list {
                    println!(
                        "{:<30} {:<20} {:>12} {:>12} {:<20} {}",
                        format!("{}@{}", s.volume, s.id),
                        s.label,
                        human(s.allocated_bytes),
                        human(s.unique_bytes),
                        time(s.created_ns),
                        s.metadata
                    );
                }
            }
        }
        SnapshotCmd::Delete { snapshot } => {
            let id = snapshot_id(&pool, &snapshot)?;
            pool.delete_snapshot(id)?;
            pool.close()?;
            println!("deleted snapshot {id}");
        }
    }
    Ok(())
}

/// `cdmfs cat`: bytes of a volume or snapshot to stdout.
fn cat(pool: &Pool, export: &str, offset: u64, length: Option<u64>) -> Result<()> {
    let t = pool.resolve(export)?;
    let (size, _) = pool.geometry(t)?;
    let len = length.unwrap_or(size.saturating_sub(offset));
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(buf.len() as u64) as usize;
        pool.read(t, pos, &mut buf[..n])?;
        out.write_all(&buf[..n])?;
        pos += n as u64;
    }
    out.flush()?;
    Ok(())
}

/// `cdmfs dump`: a hex dump, or with `map` the physical layout.
fn dump(pool: &Pool, export: &str, offset: u64, length: u64, map: bool, json: bool) -> Result<()> {
    let t = pool.resolve(export)?;
    if map {
        let m = pool.physical_map(t)?;
        if json {
            print_json(&m)?;
        } else {
            println!("{} tree nodes at pool offsets {:?}", m.nodes.len(), m.nodes);
            for (l, p, n) in m.extents {
                println!("logical {l:>14}  pool {p:>14}  {n} bytes");
            }
        }
        return Ok(());
    }
    let mut buf = vec![0u8; usize::try_from(length).context("length too large")?];
    pool.read(t, offset, &mut buf)?;
    for (i, row) in buf.chunks(16).enumerate() {
        let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
        let asc: String = row
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!(
            "{:012x}  {:<47}  {asc}",
            offset + i as u64 * 16,
            hex.join(" ")
        );
    }
    Ok(())
}

/// `cdmfs write`: a file or stdin into a volume.
fn write(pool: Pool, volume: &str, file: Option<&Path>, offset: u64) -> Result<()> {
    let id = pool.volume_id(volume)?;
    let mut input: Box<dyn Read> = match file {
        None => Box::new(std::io::stdin().lock()),
        Some(p) if p == Path::new("-") => Box::new(std::io::stdin().lock()),
        Some(p) => Box::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        ),
    };
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = offset;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = input.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        pool.write(id, pos, &buf[..n])?;
        pos += n as u64;
    }
    pool.close()?;
    println!(
        "wrote {} to {volume} at offset {offset}",
        human(pos - offset)
    );
    Ok(())
}

fn main() -> ExitCode {
    cdm_common::log::init(cdm_common::log::LevelFilter::ERROR);
    match run(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cdmfs: {e:#}");
            ExitCode::from(2)
        }
    }
}
