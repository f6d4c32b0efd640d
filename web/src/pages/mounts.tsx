// Instant mounts: a point mounted read-only, or a writable clone of it
// mounted read-write; where it is mounted on the appliance.
import { useState } from "preact/hooks";
import { call, get, may, S, seg } from "../api";
import { Confirm, ErrorBox, Field, Table, useAction, useLoad, useSession, val, when } from "../ui";

export function Mounts() {
  const s = useSession();
  const list = useLoad(() => get<S["Mount"][]>("/v1/mounts"), []);
  const a = useAction();
  const [snap, setSnap] = useState(new URLSearchParams(location.search).get("snapshot") ?? "");
  const [writable, setWritable] = useState(false);
  const [part, setPart] = useState("");
  const [made, setMade] = useState<S["Mount"] | null>(null);
  return (
    <section>
      <h1>Mounts</h1>
      <ErrorBox error={list.error || a.error} />
      {may(s, "write") && (
        <form
          class="form"
          aria-label="Mount a snapshot"
          onSubmit={(e) => {
            e.preventDefault();
            const body: S["MountCreate"] = { snapshot: snap.trim(), writable, partition: part.trim() ? Number(part) : undefined };
            a.run(async () => setMade(await call<S["Mount"]>("POST", "/v1/mounts", body)), list.reload);
          }}
        >
          <Field label="Snapshot (VOLUME@ID)">
            <input required value={snap} onInput={(e) => setSnap(val(e))} name="snapshot" />
          </Field>
          <Field label="Partition (empty: first)">
            <input value={part} onInput={(e) => setPart(val(e))} name="partition" />
          </Field>
          <label class="check">
            <input type="checkbox" checked={writable} onChange={(e) => setWritable((e.target as HTMLInputElement).checked)} name="writable" /> Writable clone
          </label>
          <button type="submit" disabled={a.busy}>
            Mount
          </button>
        </form>
      )}
      {made && (
        <div class="notice" role="status">
          Mounted {made.snapshot} at <code data-testid="mount-path">{made.path}</code> ({made.fstype}, {made.writable ? "read-write clone " + (made.clone ?? "") : "read-only"}).
        </div>
      )}
      <Table
        label="Mounts"
        rows={list.data}
        empty="Nothing mounted."
        cols={[
          { key: "name", label: "Name", value: (m) => m.name },
          { key: "snapshot", label: "Point", value: (m) => m.snapshot },
          { key: "mode", label: "Mode", value: (m) => (m.writable ? `read-write (${m.clone ?? ""})` : "read-only") },
          { key: "path", label: "Path", value: (m) => m.path, render: (m) => <code>{m.path}</code> },
          { key: "fstype", label: "Filesystem", value: (m) => m.fstype },
          { key: "state", label: "State", value: (m) => m.state + (m.message ? `: ${m.message}` : "") },
          { key: "created", label: "Mounted", value: (m) => m.created_unix, render: (m) => when(m.created_unix) },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (m) =>
              may(s, "write") ? (
                <span class="row-actions">
                  <Confirm label="Unmount" onConfirm={() => a.run(() => call("DELETE", `/v1/mounts/${seg(m.name)}`), list.reload)} />
                  {m.clone && may(s, "delete") && (
                    <Confirm label="Unmount and delete clone" danger onConfirm={() => a.run(() => call("DELETE", `/v1/mounts/${seg(m.name)}?delete_clone=true`), list.reload)} />
                  )}
                </span>
              ) : null,
          },
        ]}
      />
    </section>
  );
}
