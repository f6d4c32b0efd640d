// Volumes: list, create with the data pipeline, grow, delete (the API's
// safety answers — snapshots, clones, clients — are shown, and force is a
// second, explicit step).
import { useState } from "preact/hooks";
import { call, get, may, raw, S, seg } from "../api";
import { bytes, Confirm, ErrorBox, Field, Link, parseSize, Table, useAction, useLoad, useSession, val, when } from "../ui";

export function Volumes() {
  const s = useSession();
  const list = useLoad(() => get<S["Volume"][]>("/v1/volumes"), []);
  return (
    <section>
      <h1>Volumes</h1>
      <ErrorBox error={list.error} />
      {may(s, "write") && <CreateVolume done={list.reload} />}
      <Table
        label="Volumes"
        rows={list.data}
        empty="No volume yet."
        cols={[
          { key: "name", label: "Name", value: (v) => v.name, render: (v) => <Link href={`/volumes/${seg(v.name)}`}>{v.name}</Link> },
          { key: "kind", label: "Kind", value: (v) => v.kind },
          { key: "size", label: "Size", value: (v) => v.size, render: (v) => bytes(v.size), num: true },
          { key: "alloc", label: "Allocated", value: (v) => v.allocated_bytes, render: (v) => bytes(v.allocated_bytes), num: true },
          { key: "snaps", label: "Snapshots", value: (v) => v.snapshots, num: true },
          {
            key: "pipeline",
            label: "Pipeline",
            value: (v) => `${v.dedup ? "dedup " : ""}${v.compression ? "zstd-" + v.compression + " " : ""}${v.encryption !== "none" ? v.encryption : ""}`,
          },
          { key: "clients", label: "Clients", value: (v) => v.clients, num: true },
          { key: "created", label: "Created", value: (v) => v.created_unix, render: (v) => when(v.created_unix) },
        ]}
      />
    </section>
  );
}

function CreateVolume(p: { done: () => void }) {
  const [name, setName] = useState("");
  const [size, setSize] = useState("10G");
  const [block, setBlock] = useState("65536");
  const [dedup, setDedup] = useState(false);
  const [comp, setComp] = useState("0");
  const [enc, setEnc] = useState("none");
  const a = useAction();
  const submit = (e: Event) => {
    e.preventDefault();
    const n = parseSize(size);
    if (n === null) return a.setError(new Error(`size ${JSON.stringify(size)} is not a size: write 10G, 512M or a number of bytes`));
    const body: S["VolumeCreate"] = { name, size: n, block_size: Number(block), dedup, compression: Number(comp), encryption: enc };
    a.run(() => call("POST", "/v1/volumes", body), () => (setName(""), p.done()));
  };
  return (
    <form class="form" onSubmit={submit} aria-label="Create a volume">
      <Field label="Name">
        <input required value={name} onInput={(e) => setName(val(e))} name="name" />
      </Field>
      <Field label="Size">
        <input required value={size} onInput={(e) => setSize(val(e))} name="size" />
      </Field>
      <Field label="Block size">
        <select value={block} onChange={(e) => setBlock(val(e))} name="block_size">
          {[4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576].map((b) => (
            <option value={String(b)}>{bytes(b)}</option>
          ))}
        </select>
      </Field>
      <Field label="Compression (zstd level, 0 = off)">
        <input type="number" min={0} max={29} value={comp} onInput={(e) => setComp(val(e))} name="compression" />
      </Field>
      <Field label="Encryption">
        <select value={enc} onChange={(e) => setEnc(val(e))} name="encryption">
          {["none", "aes-256-xts", "aes-128-xts", "sm4-xts"].map((x) => (
            <option value={x}>{x}</option>
          ))}
        </select>
      </Field>
      <label class="check">
        <input type="checkbox" checked={dedup} onChange={(e) => setDedup((e.target as HTMLInputElement).checked)} name="dedup" /> Deduplication
      </label>
      <button type="submit" disabled={a.busy}>
        Create volume
      </button>
      <ErrorBox error={a.error} />
    </form>
  );
}

export function VolumePage({ name }: { name: string }) {
  const s = useSession();
  const vol = useLoad(() => get<S["Volume"]>(`/v1/volumes/${seg(name)}`), [name]);
  const a = useAction();
  const [grow, setGrow] = useState("");
  const [gone, setGone] = useState(false);
  const v = vol.data;
  if (gone)
    return (
      <section>
        <h1>Volume {name}</h1>
        <p role="status">Volume {name} was deleted.</p>
        <Link href="/volumes">Back to volumes</Link>
      </section>
    );
  const del = (force: boolean) =>
    a.run(() => call("DELETE", `/v1/volumes/${seg(name)}${force ? "?force=true" : ""}`), () => setGone(true));
  return (
    <section>
      <h1>Volume {name}</h1>
      <ErrorBox error={vol.error} />
      {v && (
        <dl class="facts">
          <dt>Kind</dt>
          <dd>{v.kind}</dd>
          <dt>Size</dt>
          <dd>{bytes(v.size)}</dd>
          <dt>Block size</dt>
          <dd>{bytes(v.block_size)}</dd>
          <dt>Allocated</dt>
          <dd>{bytes(v.allocated_bytes)}</dd>
          <dt>Unique</dt>
          <dd>{bytes(v.unique_bytes)}</dd>
          <dt>Pipeline</dt>
          <dd>
            dedup {v.dedup ? "on" : "off"}, compression {v.compression || "off"}, encryption {v.encryption}
          </dd>
          <dt>NBD export</dt>
          <dd>
            <code>{v.export}</code>
          </dd>
          {v.origin && (
            <>
              <dt>Origin</dt>
              <dd>
                {v.origin.volume ?? "?"}@{v.origin.snapshot}
              </dd>
            </>
          )}
          {v.fragmentation && (
            <>
              <dt>Fragmentation</dt>
              <dd>{v.fragmentation.runs_per_mib.toFixed(2)} runs per MiB</dd>
            </>
          )}
        </dl>
      )}
      <div class="actions">
        {may(s, "write") && (
          <form
            class="inline"
            onSubmit={(e) => {
              e.preventDefault();
              const n = parseSize(grow);
              if (n === null) return a.setError(new Error(`size ${JSON.stringify(grow)} is not a size`));
              a.run(() => call("PATCH", `/v1/volumes/${seg(name)}`, { size: n }), () => (setGrow(""), vol.reload()));
            }}
          >
            <Field label="New size">
              <input value={grow} onInput={(e) => setGrow(val(e))} name="grow" placeholder="20G" />
            </Field>
            <button type="submit">Grow</button>
          </form>
        )}
        {may(s, "delete") && <Confirm label="Delete volume" danger onConfirm={() => del(false)} />}
        {may(s, "delete") && a.error instanceof Error && (a.error as { status?: number }).status === 409 && (
          <Confirm label="Delete anyway (force)" danger onConfirm={() => del(true)} />
        )}
      </div>
      <ErrorBox error={a.error} />
      <Snapshots volume={name} changed={vol.reload} />
      <PolicyEditor volume={name} />
    </section>
  );
}

const PAGE = 100;

function Snapshots({ volume, changed }: { volume: string; changed: () => void }) {
  const s = useSession();
  const [offset, setOffset] = useState(0);
  const list = useLoad(async () => {
    const r = await fetchPage(volume, offset);
    return r;
  }, [volume, offset]);
  const a = useAction();
  const [label, setLabel] = useState("");
  const [meta, setMeta] = useState("");
  const [cloneOf, setCloneOf] = useState<number | null>(null);
  const [clone, setClone] = useState("");
  const reload = () => (list.reload(), changed());
  const create = (e: Event) => {
    e.preventDefault();
    let metadata: unknown = undefined;
    if (meta.trim()) {
      try {
        metadata = JSON.parse(meta);
      } catch (err) {
        return a.setError(new Error(`metadata is not JSON: ${err instanceof Error ? err.message : String(err)}`));
      }
    }
    a.run(() => call("POST", `/v1/volumes/${seg(volume)}/snapshots`, { label: label || undefined, metadata }), () => (setLabel(""), setMeta(""), reload()));
  };
  const total = list.data?.total ?? 0;
  return (
    <>
      <h2>Snapshots</h2>
      {may(s, "write") && (
        <form class="form" onSubmit={create} aria-label="Create a snapshot">
          <Field label="Label">
            <input value={label} onInput={(e) => setLabel(val(e))} name="label" />
          </Field>
          <Field label="Metadata (JSON object)">
            <input value={meta} onInput={(e) => setMeta(val(e))} name="metadata" placeholder='{"app": "db"}' />
          </Field>
          <button type="submit" disabled={a.busy}>
            Take snapshot
          </button>
        </form>
      )}
      {cloneOf !== null && (
        <form
          class="form"
          aria-label="Create a clone"
          onSubmit={(e) => {
            e.preventDefault();
            a.run(() => call("POST", `/v1/volumes/${seg(volume)}/snapshots/${cloneOf}/clones`, { name: clone }), () => (setCloneOf(null), setClone(""), reload()));
          }}
        >
          <Field label={`Clone name (of snapshot ${cloneOf})`}>
            <input required value={clone} onInput={(e) => setClone(val(e))} name="clone" />
          </Field>
          <button type="submit">Create clone</button>
          <button type="button" onClick={() => setCloneOf(null)}>
            Cancel
          </button>
        </form>
      )}
      <ErrorBox error={a.error || list.error} />
      <Table
        label="Snapshots"
        rows={list.data?.rows ?? null}
        empty="No snapshot."
        pageSize={PAGE}
        cols={[
          { key: "id", label: "Id", value: (x) => x.id, num: true },
          { key: "label", label: "Label", value: (x) => x.label },
          { key: "created", label: "Taken", value: (x) => x.created_unix, render: (x) => when(x.created_unix) },
          { key: "meta", label: "Metadata", value: (x) => JSON.stringify(x.metadata ?? null), render: (x) => <code>{JSON.stringify(x.metadata ?? null)}</code> },
          { key: "unique", label: "Unique", value: (x) => x.unique_bytes, render: (x) => bytes(x.unique_bytes), num: true },
          { key: "clones", label: "Clones", value: (x) => x.clones.join(", ") },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (x) => (
              <span class="row-actions">
                <Link href={`/browse/${seg(volume)}/${x.id}`}>Browse files</Link>
                {may(s, "write") && (
                  <button type="button" onClick={() => setCloneOf(x.id)}>
                    Clone
                  </button>
                )}
                {may(s, "write") && <Link href={`/mounts?snapshot=${seg(`${volume}@${x.id}`)}`}>Mount</Link>}
                {may(s, "delete") && (
                  <Confirm label="Delete" danger onConfirm={() => a.run(() => call("DELETE", `/v1/volumes/${seg(volume)}/snapshots/${x.id}`), reload)} />
                )}
              </span>
            ),
          },
        ]}
      />
      {total > PAGE && (
        <nav class="pager" aria-label="Snapshot pages">
          <button type="button" disabled={offset === 0} onClick={() => setOffset(Math.max(0, offset - PAGE))}>
            Newer
          </button>
          <span>
            {offset + 1}–{Math.min(total, offset + PAGE)} of {total}
          </span>
          <button type="button" disabled={offset + PAGE >= total} onClick={() => setOffset(offset + PAGE)}>
            Older
          </button>
        </nav>
      )}
    </>
  );
}

async function fetchPage(volume: string, offset: number) {
  const r = await raw("GET", `/v1/volumes/${seg(volume)}/snapshots?newest_first=true&limit=${PAGE}&offset=${offset}`);
  const rows = (await r.json()) as S["Snapshot"][];
  const total = Number(r.headers.get("x-total-count") ?? rows.length);
  return { rows, total };
}

function PolicyEditor({ volume }: { volume: string }) {
  const s = useSession();
  const pol = useLoad(() => get<S["Policy"]>(`/v1/volumes/${seg(volume)}/policy`), [volume]);
  const a = useAction();
  const [edit, setEdit] = useState<{ interval: string; cron: string; last: string; days: string; min: string } | null>(null);
  const p = pol.data;
  const ret = p?.retention ?? { min_keep: 1 };
  const start = () =>
    p &&
    setEdit({
      interval: String(p.schedule?.interval_secs ?? ""),
      cron: p.schedule?.cron ?? "",
      last: String(ret.keep_last ?? ""),
      days: String(ret.keep_days ?? ""),
      min: String(ret.min_keep ?? 1),
    });
  const save = (e: Event) => {
    e.preventDefault();
    if (!edit) return;
    const num = (x: string) => (x.trim() ? Number(x) : undefined);
    const schedule = edit.interval.trim() || edit.cron.trim() ? { interval_secs: num(edit.interval), cron: edit.cron.trim() || undefined } : undefined;
    const body: S["Policy"] = { schedule, retention: { keep_last: num(edit.last), keep_days: num(edit.days), min_keep: num(edit.min) ?? 1 } };
    a.run(() => call("PUT", `/v1/volumes/${seg(volume)}/policy`, body), () => (setEdit(null), pol.reload()));
  };
  return (
    <>
      <h2>Schedule and retention</h2>
      <ErrorBox error={pol.error || a.error} />
      {p && !edit && (
        <p>
          Schedule: {p.schedule?.interval_secs ? `every ${p.schedule.interval_secs} s` : p.schedule?.cron ? `cron ${p.schedule.cron}` : "none"} · keep last{" "}
          {ret.keep_last ?? "—"} · keep days {ret.keep_days ?? "—"} · at least {ret.min_keep}{" "}
          {may(s, "write") && (
            <button type="button" onClick={start}>
              Edit policy
            </button>
          )}
        </p>
      )}
      {edit && (
        <form class="form" onSubmit={save} aria-label="Snapshot policy">
          <Field label="Every N seconds">
            <input value={edit.interval} onInput={(e) => setEdit({ ...edit, interval: val(e) })} />
          </Field>
          <Field label="or cron (UTC)">
            <input value={edit.cron} onInput={(e) => setEdit({ ...edit, cron: val(e) })} />
          </Field>
          <Field label="Keep last">
            <input value={edit.last} onInput={(e) => setEdit({ ...edit, last: val(e) })} />
          </Field>
          <Field label="Keep days">
            <input value={edit.days} onInput={(e) => setEdit({ ...edit, days: val(e) })} />
          </Field>
          <Field label="At least">
            <input value={edit.min} onInput={(e) => setEdit({ ...edit, min: val(e) })} />
          </Field>
          <button type="submit">Save policy</button>
          <button type="button" onClick={() => setEdit(null)}>
            Cancel
          </button>
        </form>
      )}
    </>
  );
}
