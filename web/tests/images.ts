// Small filesystem images made with Debian's tools, as tests/tests/inspect.rs
// makes them: ext4 (mkfs.ext4 -d), XFS (an mkfs.xfs protofile), NTFS (mkntfs,
// then ntfs-3g to fill it).
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { run } from "./appliance";

export type Files = Record<string, string | Buffer>;

function tree(root: string, files: Files) {
  for (const [p, data] of Object.entries(files)) {
    const f = join(root, p);
    mkdirSync(dirname(f), { recursive: true });
    writeFileSync(f, data);
  }
}

export function ext4(dir: string, files: Files): string {
  const src = join(dir, "ext4.d");
  tree(src, files);
  const img = join(dir, "ext4.img");
  run("truncate", ["-s", "64M", img]);
  run("mkfs.ext4", ["-q", "-F", "-d", src, img]);
  return img;
}

export function xfs(dir: string, files: Files): string {
  // Protofile lines: name, mode, uid, gid, source; one directory level deep
  // is all the tests need.
  const src = join(dir, "xfs.d");
  tree(src, files);
  const dirs = new Map<string, string[]>();
  for (const p of Object.keys(files)) {
    const parts = p.split("/");
    const d = parts.length > 1 ? parts[0] : "";
    dirs.set(d, [...(dirs.get(d) ?? []), parts[parts.length - 1]]);
  }
  let proto = "/dev/null\n0 0\nd--755 0 0\n";
  for (const f of dirs.get("") ?? []) proto += ` ${f} ---644 0 0 ${join(src, f)}\n`;
  for (const [d, fs] of dirs) {
    if (!d) continue;
    proto += ` ${d} d--755 0 0\n`;
    for (const f of fs) proto += `  ${f} ---644 0 0 ${join(src, d, f)}\n`;
    proto += " $\n";
  }
  proto += "$\n";
  const pf = join(dir, "xfs.proto");
  writeFileSync(pf, proto);
  const img = join(dir, "xfs.img");
  run("truncate", ["-s", "320M", img]);
  run("mkfs.xfs", ["-q", "-f", "-p", pf, img]);
  return img;
}

export function ntfs(dir: string, files: Files): string {
  const img = join(dir, "ntfs.img");
  run("truncate", ["-s", "32M", img]);
  run("mkntfs", ["-F", "-Q", "-q", img]);
  const mnt = join(dir, "ntfs.mnt");
  mkdirSync(mnt);
  run("ntfs-3g", [img, mnt]);
  try {
    tree(mnt, files);
  } finally {
    run("umount", [mnt]);
  }
  return img;
}
