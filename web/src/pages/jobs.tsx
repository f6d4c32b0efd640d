// Jobs: the list (polled while any runs), one job's live progress and its
// log (message and result), and starting the jobs an operator may start.
import { useState } from "preact/hooks";
import { call, get, may, S } from "../api";
import { Confirm, ErrorBox, Field, Link, useAction, useLoad, useSession, val, when } from "../ui";
import { JobTable } from "./dashboard";

export function Jobs() {
  const s = useSession();
  const list = useLoad(() => get<S["Job"][]>("/v1/jobs"), [], 2_000);
  return (
    <section>
      <h1>Jobs</h1>
      <ErrorBox error={list.error} />
      {may(s, "write") && <StartJob done={list.reload} />}
      <JobTable rows={list.data} label="Jobs" empty="No job yet." />
    </section>
  );
}

function StartJob(p: { done: () => void }) {
  const [kind, setKind] = useState("scrub");
  const [volume, setVolume] = useState("");
  const [inventory, setInventory] = useState("");
  const [category, setCategory] = useState("");
  const a = useAction();
  const submit = (e: Event) => {
    e.preventDefault();
    const body: S["JobCreate"] = { kind };
    if (kind === "defrag" || kind === "delete-volume") body.volume = volume;
    if (kind === "vm-backup") {
      body.inventory = inventory;
      body.category = category;
    }
    a.run(() => call("POST", "/v1/jobs", body), p.done);
  };
  return (
    <form class="form" onSubmit={submit} aria-label="Start a job">
      <Field label="Kind">
        <select value={kind} onChange={(e) => setKind(val(e))} name="kind">
          {["scrub", "retention", "defrag", "delete-volume", "vm-backup"].map((k) => (
            <option value={k}>{k}</option>
          ))}
        </select>
      </Field>
      {(kind === "defrag" || kind === "delete-volume") && (
        <Field label="Volume">
          <input required value={volume} onInput={(e) => setVolume(val(e))} name="volume" />
        </Field>
      )}
      {kind === "vm-backup" && (
        <>
          <Field label="Inventory on the appliance">
            <input required value={inventory} onInput={(e) => setInventory(val(e))} name="inventory" />
          </Field>
          <Field label="Category">
            <input required value={category} onInput={(e) => setCategory(val(e))} name="category" placeholder="os:linux" />
          </Field>
        </>
      )}
      <button type="submit" disabled={a.busy}>
        Start job
      </button>
      <ErrorBox error={a.error} />
    </form>
  );
}

export function JobPage({ id }: { id: string }) {
  const s = useSession();
  const job = useLoad(() => get<S["Job"]>(`/v1/jobs/${encodeURIComponent(id)}`), [id], 1_000);
  const log = useLoad(() => get<S["JobLog"]>(`/v1/jobs/${encodeURIComponent(id)}/log`), [id], 2_000);
  const a = useAction();
  const j = job.data;
  const live = j && (j.state === "running" || j.state === "queued");
  return (
    <section>
      <h1>Job #{id}</h1>
      <ErrorBox error={job.error || a.error} />
      {live && may(s, "write") && (
        <Confirm label="Cancel job" danger onConfirm={() => a.run(() => call("POST", `/v1/jobs/${encodeURIComponent(id)}/cancel`), job.reload)} />
      )}
      {j && (
        <>
          <dl class="facts">
            <dt>Kind</dt>
            <dd>{j.kind}</dd>
            <dt>State</dt>
            <dd>
              <span class={`state ${j.state}`} data-testid="job-state">
                {j.state}
              </span>
            </dd>
            <dt>Progress</dt>
            <dd>
              <progress max={1} value={j.progress} aria-label="Progress" /> {Math.round(j.progress * 100)}% ({j.done} of {j.total})
            </dd>
            <dt>Started</dt>
            <dd>
              {when(j.created_unix)} by {j.created_by}
            </dd>
            <dt>Finished</dt>
            <dd>{when(j.finished_unix)}</dd>
          </dl>
          <h2>Log</h2>
          <pre class="log" data-testid="job-log">
            {(log.data?.lines ?? []).map((l) => `${when(l.time_unix)} ${l.line}\n`).join("")}
            {j.message}
            {j.result ? "\n" + JSON.stringify(j.result, null, 2) : ""}
          </pre>
        </>
      )}
      <Link href="/jobs">All jobs</Link>
    </section>
  );
}
