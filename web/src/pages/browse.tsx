// The file browser of a point: partitions, directories (paged by the API),
// download of a file or a tar of a folder. ext4, XFS and NTFS are read by
// the appliance without mounting anything.
import { useState } from "preact/hooks";
import { download, get, S, seg } from "../api";
import { bytes, ErrorBox, Field, Link, Table, useAction, useLoad, val } from "../ui";

const PAGE = 500;

export function Browse({ volume, id }: { volume: string; id: string }) {
  const params = new URLSearchParams(location.search);
  const [path, setPathState] = useState(params.get("path") ?? "/");
  const [part, setPart] = useState<string>(params.get("partition") ?? "");
  const [offset, setOffset] = useState(0);
  const base = `/v1/volumes/${seg(volume)}/snapshots/${encodeURIComponent(id)}`;
  const parts = useLoad(() => get<S["PartitionInfo"][]>(`${base}/partitions`), [base]);
  const q = (p: string) => `path=${encodeURIComponent(p)}${part ? `&partition=${encodeURIComponent(part)}` : ""}`;
  const files = useLoad(() => get<S["FileEntry"][]>(`${base}/files?${q(path)}&limit=${PAGE}&offset=${offset}`), [base, path, part, offset]);
  const a = useAction();
  const setPath = (p: string) => {
    setPathState(p);
    setOffset(0);
    const u = new URLSearchParams({ path: p });
    if (part) u.set("partition", part);
    history.replaceState(null, "", `${location.pathname}?${u}`);
  };
  const up = path === "/" ? null : path.replace(/\/[^/]*\/?$/, "") || "/";
  const crumbs = path.split("/").filter(Boolean);
  return (
    <section>
      <h1>
        Files of {volume}@{id}
      </h1>
      <ErrorBox error={parts.error} />
      {parts.data && parts.data.length > 0 && (
        <Field label="Partition">
          <select value={part} onChange={(e) => (setPart(val(e)), setPath("/"))} name="partition">
            <option value="">first</option>
            <option value="0">whole disk</option>
            {parts.data.map((p) => (
              <option value={String(p.number)}>
                {p.number}: {p.kind} {bytes(p.size)}
              </option>
            ))}
          </select>
        </Field>
      )}
      <nav class="crumbs" aria-label="Path">
        <button type="button" class="link" onClick={() => setPath("/")}>
          /
        </button>
        {crumbs.map((c, i) => (
          <>
            <button type="button" class="link" onClick={() => setPath("/" + crumbs.slice(0, i + 1).join("/"))}>
              {c}
            </button>
            {i < crumbs.length - 1 ? " / " : ""}
          </>
        ))}
      </nav>
      <div class="actions">
        {up !== null && (
          <button type="button" onClick={() => setPath(up)}>
            Up
          </button>
        )}
        <button type="button" onClick={() => a.run(() => download(`${base}/files/tar?${q(path)}`, `${volume}-${id}${path === "/" ? "" : "-" + crumbs[crumbs.length - 1]}.tar`))}>
          Download this folder as tar
        </button>
      </div>
      <ErrorBox error={files.error || a.error} />
      <Table
        label="Files"
        rows={files.data}
        pageSize={PAGE}
        empty="Empty folder."
        cols={[
          {
            key: "name",
            label: "Name",
            value: (f) => f.name,
            render: (f) =>
              f.kind === "dir" ? (
                <button type="button" class="link" onClick={() => setPath(f.path)}>
                  {f.name}/
                </button>
              ) : (
                <span>
                  {f.name}
                  {f.target ? ` → ${f.target}` : ""}
                </span>
              ),
          },
          { key: "kind", label: "Kind", value: (f) => f.kind },
          { key: "size", label: "Size", value: (f) => f.size, render: (f) => bytes(f.size), num: true },
          { key: "mode", label: "Mode", value: (f) => f.mode, render: (f) => (f.mode & 0o7777).toString(8).padStart(4, "0") },
          { key: "owner", label: "Owner", value: (f) => `${f.uid}:${f.gid}` },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (f) =>
              f.kind === "file" ? (
                <button type="button" onClick={() => a.run(() => download(`${base}/files/content?${q(f.path)}`, f.name))} aria-label={`Download ${f.name}`}>
                  Download
                </button>
              ) : f.kind === "dir" ? (
                <button type="button" onClick={() => a.run(() => download(`${base}/files/tar?${q(f.path)}`, `${f.name}.tar`))} aria-label={`Download ${f.name} as tar`}>
                  Tar
                </button>
              ) : null,
          },
        ]}
      />
      {(offset > 0 || (files.data?.length ?? 0) >= PAGE) && (
        <nav class="pager" aria-label="Folder pages">
          <button type="button" disabled={offset === 0} onClick={() => setOffset(Math.max(0, offset - PAGE))}>
            Previous
          </button>
          <button type="button" disabled={(files.data?.length ?? 0) < PAGE} onClick={() => setOffset(offset + PAGE)}>
            Next
          </button>
        </nav>
      )}
      <Link href={`/volumes/${seg(volume)}`}>Back to {volume}</Link>
    </section>
  );
}
