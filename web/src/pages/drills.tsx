// Recovery drills: each application's drill history (passed or not, the
// measured RTO and RPO against the policy's targets, every check with its
// output) and a button to drill a point now. Also the page of every drill.
import { useState } from "preact/hooks";
import { call, get, may, S } from "../api";
import { ErrorBox, Field, Link, Table, useAction, useLoad, useSession, val, when } from "../ui";

function secs(n: number | null | undefined, digits = 2): string {
  return n === null || n === undefined ? "—" : `${n.toFixed(digits)} s`;
}

function Verdict({ passed }: { passed: boolean }) {
  return <span class={`rpo ${passed ? "ok" : "failing"}`}>{passed ? "passed" : "failed"}</span>;
}

/// The checks of one drill, each with its output.
export function DrillChecks({ d }: { d: S["Drill"] }) {
  return (
    <details>
      <summary>
        {d.checks.length} checks · {d.message}
      </summary>
      <ul class="checks" aria-label={`Checks of drill ${d.id}`}>
        {d.checks.map((c) => (
          <li>
            <Verdict passed={c.passed} /> <strong>{c.name}</strong> ({secs(c.seconds)})
            <pre>{c.output}</pre>
          </li>
        ))}
      </ul>
    </details>
  );
}

/// The drills of `application` (all drills when absent), newest first.
export function Drills({ application }: { application?: number }) {
  const s = useSession();
  const q = application === undefined ? "" : `?application=${application}`;
  const list = useLoad(() => get<S["Drill"][]>(`/v1/drills${q}`), [q], 10_000);
  const a = useAction();
  const [probe, setProbe] = useState({ sql: "", expect: "" });
  const [job, setJob] = useState<S["Job"] | null>(null);
  return (
    <div>
      <ErrorBox error={list.error || a.error} />
      {application !== undefined && may(s, "write") && (
        <form
          class="form"
          aria-label="Run a drill"
          onSubmit={(e) => {
            e.preventDefault();
            const body: S["DrillCreate"] = probe.sql.trim() ? { probes: [{ sql: probe.sql, expect: probe.expect }] } : {};
            a.run(async () => setJob(await call<S["Job"]>("POST", `/v1/applications/${application}/drills`, body)), list.reload);
          }}
        >
          <Field label="Probe SQL (optional)">
            <input value={probe.sql} onInput={(e) => setProbe({ ...probe, sql: val(e) })} />
          </Field>
          <Field label="Expected answer">
            <input value={probe.expect} placeholder=">= 1000" onInput={(e) => setProbe({ ...probe, expect: val(e) })} />
          </Field>
          <button type="submit">Run drill</button>
        </form>
      )}
      {job && (
        <p role="status">
          Drill started: <Link href={`/jobs/${job.id}`}>job #{job.id}</Link>.
        </p>
      )}
      <Table
        label="Drills"
        rows={list.data}
        empty="No drill yet."
        cols={[
          { key: "id", label: "Drill", value: (d) => d.id, num: true },
          ...(application === undefined
            ? [{ key: "app", label: "Application", value: (d: S["Drill"]) => d.application, render: (d: S["Drill"]) => <Link href={`/applications/${d.application}`}>{d.application}</Link> }]
            : []),
          { key: "point", label: "Point", value: (d) => `${d.volume}@${d.snapshot}` },
          { key: "started", label: "Started", value: (d) => d.started_unix, render: (d) => when(d.started_unix) },
          { key: "passed", label: "Result", value: (d) => (d.passed ? "passed" : "failed"), render: (d) => <Verdict passed={d.passed} /> },
          { key: "rto", label: "RTO", value: (d) => d.rto_seconds ?? -1, render: (d) => `${secs(d.rto_seconds)}${d.rto_target ? ` / ${d.rto_target} s` : ""}` },
          { key: "rpo", label: "RPO", value: (d) => d.rpo_seconds ?? -1, render: (d) => `${d.rpo_seconds ?? "—"} s${d.rpo_target ? ` / ${d.rpo_target} s` : ""}` },
          { key: "host", label: "Ran on", value: (d) => d.host },
          { key: "checks", label: "Checks", value: (d) => d.message ?? "", render: (d) => <DrillChecks d={d} /> },
        ]}
      />
    </div>
  );
}

export function DrillsPage() {
  return (
    <section>
      <h1>Recovery drills</h1>
      <Drills />
    </section>
  );
}
