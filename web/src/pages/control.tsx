// The control plane: hosts (enrolment tokens, retirement), applications
// with their RPO state, points and restores, and protection policies.
import { useState } from "preact/hooks";
import { call, get, may, S, seg } from "../api";
import { bytes, Confirm, ErrorBox, Field, Link, Table, useAction, useLoad, useSession, val, when } from "../ui";
import { Drills } from "./drills";

export function RpoBadge({ state }: { state: string }) {
  return <span class={`rpo ${state}`}>{state}</span>;
}

export function Hosts() {
  const s = useSession();
  const list = useLoad(() => get<S["Host"][]>("/v1/hosts"), [], 10_000);
  const a = useAction();
  const [name, setName] = useState("");
  const [tok, setTok] = useState<S["EnrolmentToken"] | null>(null);
  return (
    <section>
      <h1>Hosts</h1>
      <ErrorBox error={list.error || a.error} />
      {may(s, "admin") && (
        <form
          class="form"
          aria-label="Enrol a host"
          onSubmit={(e) => {
            e.preventDefault();
            a.run(async () => setTok(await call<S["EnrolmentToken"]>("POST", "/v1/hosts/enrolments", { name: name.trim() || undefined })));
          }}
        >
          <Field label="Host name (optional)">
            <input value={name} onInput={(e) => setName(val(e))} name="host" />
          </Field>
          <button type="submit">Make an enrolment token</button>
        </form>
      )}
      {tok && (
        <div class="notice" role="status">
          One-use enrolment token, valid until {when(tok.expires_unix)}: <code data-testid="enrol-token">{tok.token}</code>
          {tok.ca_sha256 ? ` (CA sha256 ${tok.ca_sha256})` : ""} — give it to <code>cdm-agent enrol</code>; it is not shown again.
        </div>
      )}
      <Table
        label="Hosts"
        rows={list.data}
        empty="No host enrolled."
        cols={[
          { key: "name", label: "Name", value: (h) => h.name, render: (h) => <Link href={`/applications?host=${seg(h.name)}`}>{h.name}</Link> },
          { key: "state", label: "State", value: (h) => h.state, render: (h) => <span class={`host ${h.state}`}>{h.state}</span> },
          { key: "seen", label: "Last seen", value: (h) => h.last_seen_unix ?? 0, render: (h) => when(h.last_seen_unix) },
          { key: "hostname", label: "Host name", value: (h) => h.hostname },
          { key: "os", label: "OS", value: (h) => h.os },
          { key: "version", label: "Agent", value: (h) => h.version },
          { key: "jobs", label: "Running jobs", value: (h) => h.running_jobs.join(", ") },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (h) =>
              may(s, "admin") && h.state !== "retired" ? (
                <Confirm label="Retire" danger onConfirm={() => a.run(() => call("DELETE", `/v1/hosts/${seg(h.name)}`), list.reload)} />
              ) : null,
          },
        ]}
      />
    </section>
  );
}

export function Applications() {
  const s = useSession();
  const host = new URLSearchParams(location.search).get("host") ?? "";
  const list = useLoad(() => get<S["Application"][]>(`/v1/applications${host ? `?host=${encodeURIComponent(host)}` : ""}`), [host], 10_000);
  const pols = useLoad(() => get<S["ProtectionPolicy"][]>("/v1/protection-policies"), []);
  const a = useAction();
  const [form, setForm] = useState({ host, kind: "postgresql", name: "", config: "{}", policy: "" });
  return (
    <section>
      <h1>Applications{host ? ` of ${host}` : ""}</h1>
      <ErrorBox error={list.error || a.error} />
      {may(s, "write") && (
        <form
          class="form"
          aria-label="Register an application"
          onSubmit={(e) => {
            e.preventDefault();
            let config: unknown;
            try {
              config = JSON.parse(form.config || "{}");
            } catch (err) {
              return a.setError(new Error(`config is not JSON: ${err instanceof Error ? err.message : String(err)}`));
            }
            const body = { host: form.host, kind: form.kind, name: form.name, config, policy: form.policy || undefined } as S["ApplicationCreate"];
            a.run(() => call("POST", "/v1/applications", body), list.reload);
          }}
        >
          <Field label="Host">
            <input required value={form.host} onInput={(e) => setForm({ ...form, host: val(e) })} />
          </Field>
          <Field label="Kind">
            <select value={form.kind} onChange={(e) => setForm({ ...form, kind: val(e) })}>
              {["postgresql", "mariadb", "files", "block", "vm"].map((k) => (
                <option value={k}>{k}</option>
              ))}
            </select>
          </Field>
          <Field label="Application name">
            <input required value={form.name} onInput={(e) => setForm({ ...form, name: val(e) })} />
          </Field>
          <Field label="Config (JSON)">
            <input value={form.config} onInput={(e) => setForm({ ...form, config: val(e) })} />
          </Field>
          <Field label="Policy">
            <select value={form.policy} onChange={(e) => setForm({ ...form, policy: val(e) })}>
              <option value="">none</option>
              {(pols.data ?? []).map((p) => (
                <option value={p.name}>{p.name}</option>
              ))}
            </select>
          </Field>
          <button type="submit">Register</button>
        </form>
      )}
      <AppTable rows={list.data} />
    </section>
  );
}

export function AppTable({ rows, label = "Applications" }: { rows: S["Application"][] | null; label?: string }) {
  return (
    <Table
      label={label}
      rows={rows}
      empty="No application."
      cols={[
        { key: "name", label: "Name", value: (x) => x.name, render: (x) => <Link href={`/applications/${x.id}`}>{x.name}</Link> },
        { key: "host", label: "Host", value: (x) => x.host },
        { key: "kind", label: "Kind", value: (x) => x.kind },
        { key: "rpo", label: "RPO state", value: (x) => x.rpo.state, render: (x) => <RpoBadge state={x.rpo.state} /> },
        { key: "last", label: "Last point", value: (x) => x.rpo.last_point_unix ?? 0, render: (x) => when(x.rpo.last_point_unix) },
        { key: "policy", label: "Policy", value: (x) => x.policy ?? "" },
        { key: "job", label: "Last job", value: (x) => (x.rpo.last_job ? `${x.rpo.last_job.state} ${x.rpo.last_job.message}` : "") },
      ]}
    />
  );
}

export function ApplicationPage({ id }: { id: string }) {
  const s = useSession();
  const app = useLoad(() => get<S["Application"]>(`/v1/applications/${encodeURIComponent(id)}`), [id], 10_000);
  const points = useLoad(() => get<S["Point"][]>(`/v1/applications/${encodeURIComponent(id)}/points`), [id]);
  const pols = useLoad(() => get<S["ProtectionPolicy"][]>("/v1/protection-policies"), []);
  const a = useAction();
  const [job, setJob] = useState<S["Job"] | null>(null);
  const [restore, setRestore] = useState<{ snapshot: number; kind: string; host: string; target: string } | null>(null);
  const x = app.data;
  const base = `/v1/applications/${encodeURIComponent(id)}`;
  return (
    <section>
      <h1>Application {x ? x.name : id}</h1>
      <ErrorBox error={app.error || points.error || a.error} />
      {x && (
        <dl class="facts">
          <dt>Host</dt>
          <dd>{x.host}</dd>
          <dt>Kind</dt>
          <dd>{x.kind}</dd>
          <dt>RPO</dt>
          <dd>
            <RpoBadge state={x.rpo.state} /> · newest point {when(x.rpo.last_point_unix)}
            {x.rpo.rpo_seconds ? ` · objective ${x.rpo.rpo_seconds} s` : ""}
          </dd>
          <dt>Volume</dt>
          <dd>
            <Link href={`/volumes/${seg(x.volume)}`}>{x.volume}</Link> {x.size_bytes ? bytes(x.size_bytes) : ""}
          </dd>
          <dt>Config</dt>
          <dd>
            <code>{JSON.stringify(x.config)}</code>
          </dd>
          <dt>Policy</dt>
          <dd>
            {may(s, "write") ? (
              <select
                aria-label="Protection policy"
                value={x.policy ?? ""}
                onChange={(e) => a.run(() => call("PUT", `${base}/policy`, { policy: val(e) || null }), app.reload)}
              >
                <option value="">none</option>
                {(pols.data ?? []).map((p) => (
                  <option value={p.name}>{p.name}</option>
                ))}
              </select>
            ) : (
              (x.policy ?? "none")
            )}
          </dd>
        </dl>
      )}
      {may(s, "write") && (
        <div class="actions">
          <button type="button" onClick={() => a.run(async () => setJob(await call<S["Job"]>("POST", `${base}/backups`)))}>
            Back up now
          </button>
        </div>
      )}
      {job && (
        <p role="status">
          Started <Link href={`/jobs/${job.id}`}>job #{job.id}</Link>.
        </p>
      )}
      <h2>Points</h2>
      {restore && (
        <form
          class="form"
          aria-label="Restore a point"
          onSubmit={(e) => {
            e.preventDefault();
            const body: S["RestoreCreate"] = { kind: restore.kind, snapshot: restore.snapshot, host: restore.host || undefined, target: restore.target || undefined };
            a.run(async () => setJob(await call<S["Job"]>("POST", `${base}/restores`, body)), () => setRestore(null));
          }}
        >
          <Field label={`Restore of point ${restore.snapshot}`}>
            <select value={restore.kind} onChange={(e) => setRestore({ ...restore, kind: val(e) })}>
              <option value="instant">instant (run from the appliance)</option>
              <option value="clone">clone (writable copy)</option>
              <option value="regular">regular (copy back)</option>
            </select>
          </Field>
          <Field label="On host (default: the application's)">
            <input value={restore.host} onInput={(e) => setRestore({ ...restore, host: val(e) })} />
          </Field>
          {restore.kind === "regular" && (
            <Field label="Target directory">
              <input required value={restore.target} onInput={(e) => setRestore({ ...restore, target: val(e) })} />
            </Field>
          )}
          <button type="submit">Start restore</button>
          <button type="button" onClick={() => setRestore(null)}>
            Cancel
          </button>
        </form>
      )}
      <Table
        label="Points"
        rows={points.data}
        empty="No point yet."
        cols={[
          { key: "snapshot", label: "Snapshot", value: (p) => p.snapshot, num: true },
          { key: "created", label: "Taken", value: (p) => p.created_unix, render: (p) => when(p.created_unix) },
          { key: "label", label: "Label", value: (p) => p.label },
          { key: "meta", label: "Metadata", value: (p) => JSON.stringify(p.metadata), render: (p) => <code>{JSON.stringify(p.metadata)}</code> },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (p) => (
              <span class="row-actions">
                <Link href={`/browse/${seg(p.volume)}/${p.snapshot}`}>Browse files</Link>
                {may(s, "write") && (
                  <button type="button" onClick={() => setRestore({ snapshot: p.snapshot, kind: "instant", host: "", target: "" })}>
                    Restore
                  </button>
                )}
              </span>
            ),
          },
        ]}
      />
      <h2>Recovery drills</h2>
      {x && <Drills application={x.id} />}
      {may(s, "delete") && x && (
        <div class="actions">
          <Confirm label="Forget application" danger onConfirm={() => a.run(() => call("DELETE", base), () => history.back())} />
        </div>
      )}
    </section>
  );
}

export function Policies() {
  const s = useSession();
  const list = useLoad(() => get<S["ProtectionPolicy"][]>("/v1/protection-policies"), []);
  const a = useAction();
  const [f, setF] = useState({ name: "", interval: "3600", cron: "", rpo: "7200", keep_last: "24", keep_days: "", dedup: true, compression: "3" });
  const num = (x: string) => (x.trim() ? Number(x) : undefined);
  return (
    <section>
      <h1>Protection policies</h1>
      <ErrorBox error={list.error || a.error} />
      {may(s, "write") && (
        <form
          class="form"
          aria-label="Create a policy"
          onSubmit={(e) => {
            e.preventDefault();
            const body = {
              name: f.name,
              interval_seconds: f.cron.trim() ? undefined : num(f.interval),
              cron: f.cron.trim() || undefined,
              rpo_seconds: Number(f.rpo),
              keep_last: num(f.keep_last),
              keep_days: num(f.keep_days),
              volume: { dedup: f.dedup, compression: num(f.compression) },
            } as S["ProtectionPolicy"];
            a.run(() => call("POST", "/v1/protection-policies", body), list.reload);
          }}
        >
          <Field label="Policy name">
            <input required value={f.name} onInput={(e) => setF({ ...f, name: val(e) })} />
          </Field>
          <Field label="Every N seconds">
            <input value={f.interval} onInput={(e) => setF({ ...f, interval: val(e) })} />
          </Field>
          <Field label="or cron (UTC)">
            <input value={f.cron} onInput={(e) => setF({ ...f, cron: val(e) })} />
          </Field>
          <Field label="RPO (seconds)">
            <input required value={f.rpo} onInput={(e) => setF({ ...f, rpo: val(e) })} />
          </Field>
          <Field label="Keep last">
            <input value={f.keep_last} onInput={(e) => setF({ ...f, keep_last: val(e) })} />
          </Field>
          <Field label="Keep days">
            <input value={f.keep_days} onInput={(e) => setF({ ...f, keep_days: val(e) })} />
          </Field>
          <Field label="Compression">
            <input value={f.compression} onInput={(e) => setF({ ...f, compression: val(e) })} />
          </Field>
          <label class="check">
            <input type="checkbox" checked={f.dedup} onChange={(e) => setF({ ...f, dedup: (e.target as HTMLInputElement).checked })} /> Deduplication
          </label>
          <button type="submit">Create policy</button>
        </form>
      )}
      <Table
        label="Policies"
        rows={list.data}
        empty="No policy."
        cols={[
          { key: "name", label: "Name", value: (p) => p.name },
          { key: "schedule", label: "Schedule", value: (p) => (p.cron ? `cron ${p.cron}` : p.interval_seconds ? `every ${p.interval_seconds} s` : "on demand") },
          { key: "rpo", label: "RPO", value: (p) => p.rpo_seconds, render: (p) => `${p.rpo_seconds} s`, num: true },
          { key: "keep", label: "Keep", value: (p) => `last ${p.keep_last ?? "—"}, days ${p.keep_days ?? "—"}` },
          { key: "windows", label: "Windows", value: (p) => (p.windows ?? []).map((w) => `${w.start}–${w.end}`).join(", ") },
          { key: "retries", label: "Retries", value: (p) => p.retries ?? 2, num: true },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (p) =>
              may(s, "delete") ? <Confirm label="Delete" danger onConfirm={() => a.run(() => call("DELETE", `/v1/protection-policies/${seg(p.name)}`), list.reload)} /> : null,
          },
        ]}
      />
    </section>
  );
}
