// Clones: writable volumes made from snapshots; promote, delete, and the
// NBD URIs to copy.
import { call, get, may, S, seg } from "../api";
import { bytes, Confirm, ErrorBox, Link, Table, useAction, useLoad, useSession, when } from "../ui";

export function Clones() {
  const s = useSession();
  const list = useLoad(() => Promise.all([get<S["Volume"][]>("/v1/clones"), get<S["Export"][]>("/v1/exports")]), []);
  const a = useAction();
  const uris = new Map((list.data?.[1] ?? []).map((e) => [e.name, e.uris]));
  return (
    <section>
      <h1>Clones</h1>
      <p class="muted">Make a clone from a snapshot on its volume's page.</p>
      <ErrorBox error={list.error || a.error} />
      <Table
        label="Clones"
        rows={list.data?.[0] ?? null}
        empty="No clone."
        cols={[
          { key: "name", label: "Name", value: (v) => v.name, render: (v) => <Link href={`/volumes/${seg(v.name)}`}>{v.name}</Link> },
          { key: "origin", label: "Origin", value: (v) => (v.origin ? `${v.origin.volume ?? "?"}@${v.origin.snapshot}` : "promoted") },
          { key: "size", label: "Size", value: (v) => v.size, render: (v) => bytes(v.size), num: true },
          {
            key: "uri",
            label: "NBD URI",
            value: (v) => (uris.get(v.export) ?? []).join(" "),
            render: (v) => (
              <span class="uris">
                {(uris.get(v.export) ?? []).map((u) => (
                  <span class="uri">
                    <code>{u}</code>{" "}
                    <button type="button" onClick={() => navigator.clipboard?.writeText(u)} aria-label={`Copy ${u}`}>
                      Copy
                    </button>
                  </span>
                ))}
              </span>
            ),
          },
          { key: "created", label: "Created", value: (v) => v.created_unix, render: (v) => when(v.created_unix) },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (v) => (
              <span class="row-actions">
                {may(s, "write") && v.origin && (
                  <button type="button" onClick={() => a.run(() => call("POST", `/v1/clones/${seg(v.name)}/promote`), list.reload)}>
                    Promote
                  </button>
                )}
                {may(s, "delete") && <Confirm label="Delete" danger onConfirm={() => a.run(() => call("DELETE", `/v1/clones/${seg(v.name)}`), list.reload)} />}
              </span>
            ),
          },
        ]}
      />
    </section>
  );
}
