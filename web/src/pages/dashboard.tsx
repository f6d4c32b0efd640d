// Dashboard: pool capacity and its trend (samples kept in this browser
// session: the API gives the present, not a history), data reduction,
// running and failed jobs, job durations, recent alerts.
import { useMemo } from "preact/hooks";
import { get, S } from "../api";
import { bytes, Chart, ErrorBox, Link, Table, useLoad, when } from "../ui";
import { AppTable, RpoBadge } from "./control";

const HIST = "cdm.capacity";

function remember(p: S["PoolInfo"]): [number[], number[]] {
  let h: [number, number][] = [];
  try {
    h = JSON.parse(sessionStorage.getItem(HIST) ?? "[]");
  } catch {
    h = [];
  }
  const now = Math.floor(Date.now() / 1000);
  const last = h[h.length - 1];
  if (!last || now - last[0] >= 5) h.push([now, p.used_bytes]);
  h = h.slice(-720);
  sessionStorage.setItem(HIST, JSON.stringify(h));
  return [h.map((x) => x[0]), h.map((x) => x[1])];
}

export function Dashboard() {
  const pool = useLoad(() => get<S["PoolInfo"]>("/v1/pool"), [], 10_000);
  const jobs = useLoad(() => get<S["Job"][]>("/v1/jobs"), [], 3_000);
  const apps = useLoad(() => get<S["Application"][]>("/v1/applications"), [], 10_000);
  const alerts = useLoad(() => get<S["Event"][]>("/v1/events?type=alert.*&limit=10"), [], 10_000);
  const p = pool.data;
  const hist = useMemo(() => (p ? remember(p) : null), [p]);
  const running = (jobs.data ?? []).filter((j) => j.state === "running" || j.state === "queued");
  const failed = (jobs.data ?? []).filter((j) => j.state === "failed").slice(0, 10);
  const durations = useMemo(() => {
    const done = (jobs.data ?? []).filter((j) => j.finished_unix).slice(0, 50).reverse();
    return [done.map((j) => j.id), done.map((j) => (j.finished_unix ?? j.created_unix) - j.created_unix)] as [number[], number[]];
  }, [jobs.data]);
  const usedPct = p && p.total_bytes ? Math.round((100 * p.used_bytes) / p.total_bytes) : 0;
  return (
    <section>
      <h1>Dashboard</h1>
      <ErrorBox error={pool.error || jobs.error || alerts.error || apps.error} />
      <div class="cards">
        <div class="card" data-testid="capacity">
          <h2>Pool capacity</h2>
          {p ? (
            <>
              <div class="big">
                {bytes(p.used_bytes)} of {bytes(p.total_bytes)} used
              </div>
              <div class="bar" role="progressbar" aria-label="Pool used" aria-valuenow={usedPct} aria-valuemin={0} aria-valuemax={100}>
                <div class={usedPct > 85 ? "fill warn" : "fill"} style={{ width: `${usedPct}%` }} />
              </div>
              <p>
                {bytes(p.free_bytes)} free · state <strong>{p.state || "ok"}</strong>
                {p.state_message ? ` — ${p.state_message}` : ""}
              </p>
              <p>
                <span data-testid="volume-count">{p.volumes}</span> volumes · <span data-testid="snapshot-count">{p.snapshots}</span> snapshots · key {p.encryption_key}
              </p>
            </>
          ) : (
            <p>Loading…</p>
          )}
        </div>
        <div class="card">
          <h2>Data reduction</h2>
          {p ? (
            <>
              <div class="big" data-testid="reduction">{p.reduction.pool.ratio.toFixed(2)}×</div>
              <p>
                {bytes(p.reduction.pool.logical_bytes)} logical → {bytes(p.reduction.pool.after_dedup_bytes)} after dedup →{" "}
                {bytes(p.reduction.pool.after_compression_bytes)} stored
              </p>
            </>
          ) : (
            <p>Loading…</p>
          )}
        </div>
        <div class="card" data-testid="rpo">
          <h2>Applications by RPO state</h2>
          {apps.data ? (
            <ul class="rpo-counts">
              {["ok", "late", "failing", "unprotected"].map((st) => (
                <li>
                  <RpoBadge state={st} /> <span data-testid={`rpo-${st}`}>{apps.data!.filter((a) => a.rpo.state === st).length}</span>
                </li>
              ))}
            </ul>
          ) : (
            <p>Loading…</p>
          )}
          <Link href="/applications">All applications</Link>
        </div>
        <div class="card">
          <h2>Jobs</h2>
          <p class="big">
            <span data-testid="running-count">{running.length}</span> running · <span data-testid="failed-count">{failed.length}</span> failed
          </p>
          <Link href="/jobs">All jobs</Link>
        </div>
      </div>
      <div class="cards">
        {hist && hist[0].length > 0 && (
          <Chart title="Used capacity over time (this session)" data={hist} series={[{ label: "used", stroke: "#1f5f8b", fill: "rgba(31,95,139,0.15)" }]} yFmt={bytes} />
        )}
        {durations[0].length > 0 && (
          <Chart title="Durations of recent jobs (seconds, by job id)" data={durations} series={[{ label: "seconds", stroke: "#7a4d00", fill: "rgba(122,77,0,0.3)" }]} bars xIsTime={false} />
        )}
      </div>
      <h2>Late and failing applications</h2>
      <AppTable label="Late and failing applications" rows={apps.data ? apps.data.filter((a) => a.rpo.state === "late" || a.rpo.state === "failing") : null} />
      <h2>Running jobs</h2>
      <JobTable rows={jobs.data ? running : null} label="Running jobs" empty="No job is running." />
      <h2>Failed jobs</h2>
      <JobTable rows={jobs.data ? failed : null} label="Failed jobs" empty="No job failed." />
      <h2>Recent alerts</h2>
      <Table
        label="Recent alerts"
        rows={alerts.data}
        empty="No alert."
        cols={[
          { key: "time", label: "Time", value: (e) => e.time_unix, render: (e) => when(e.time_unix) },
          { key: "type", label: "Type", value: (e) => e.type },
          { key: "subject", label: "Subject", value: (e) => e.subject },
          { key: "data", label: "Details", value: (e) => JSON.stringify(e.data) },
        ]}
      />
    </section>
  );
}

export function JobTable(p: { rows: S["Job"][] | null; label: string; empty: string }) {
  return (
    <Table
      label={p.label}
      rows={p.rows}
      empty={p.empty}
      cols={[
        { key: "id", label: "Job", value: (j) => j.id, render: (j) => <Link href={`/jobs/${j.id}`}>#{j.id}</Link>, num: true },
        { key: "kind", label: "Kind", value: (j) => j.kind },
        { key: "state", label: "State", value: (j) => j.state, render: (j) => <span class={`state ${j.state}`}>{j.state}</span> },
        {
          key: "progress",
          label: "Progress",
          value: (j) => j.progress,
          render: (j) => <progress max={1} value={j.progress} aria-label={`Job ${j.id} progress`} />,
        },
        { key: "message", label: "Message", value: (j) => j.message },
        { key: "by", label: "By", value: (j) => j.created_by },
        { key: "created", label: "Started", value: (j) => j.created_unix, render: (j) => when(j.created_unix) },
      ]}
    />
  );
}
