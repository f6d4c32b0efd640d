// The drills of an application: started from its page, run by an agent
// (here the protocol spoken by the test, as cdm-agent serve does), and the
// report shown — failed, with the measured RTO against nothing, and each
// check with its output — on the application's page and on the Drills page.
import { expect, signIn, test } from "./appliance";

test("a drill is started from the application page and its report shows every check", async ({ page, app }) => {
  const t = await app.api<{ token: string }>("POST", "/v1/hosts/enrolments", { name: "pgdrill" });
  const r = await fetch(`${app.url}/v1/agent/enrol`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: t.token, hostname: "pgdrill.example", version: "test", os: "linux" }),
  });
  expect(r.status).toBe(201);
  const cred = ((await r.json()) as { credential: string }).credential;
  const agent = <T>(method: string, path: string, body?: unknown) => app.api<T>(method, path, body, cred);
  await agent("POST", "/v1/agent/heartbeat", { first: true, running: [], applications: [] });
  const a = await app.api<{ id: number; volume: string }>("POST", "/v1/applications", {
    host: "pgdrill",
    kind: "postgresql",
    name: "orders",
    config: { host: "/run/postgresql", port: 5432 },
  });
  await app.api("POST", "/v1/volumes", { name: a.volume, size: 1 << 20 });
  const snap = await app.api<{ id: number }>("POST", `/v1/volumes/${a.volume}/snapshots`, { label: "nightly" });

  await signIn(page, app, "alice", `/applications/${a.id}`);
  await expect(page.getByRole("table", { name: "Drills" })).toContainText("No drill yet.");
  const f = page.getByRole("form", { name: "Run a drill" });
  await f.getByLabel("Probe SQL (optional)", { exact: true }).fill("SELECT count(*) FROM orders");
  await f.getByLabel("Expected answer", { exact: true }).fill(">= 1000");
  await f.getByRole("button", { name: "Run drill" }).click();
  await expect(page.getByRole("status")).toContainText("Drill started");

  // The agent takes the job: the probe went with it; it reports.
  const jobs = await agent<{ id: number; kind: string; params: { snapshot: number; name: string; probes: { sql: string; expect: string }[] } }[]>(
    "GET",
    "/v1/agent/jobs?wait=5",
  );
  expect(jobs.length).toBe(1);
  expect(jobs[0].kind).toBe("drill");
  expect(jobs[0].params.snapshot).toBe(snap.id);
  expect(jobs[0].params.probes[0]).toEqual({ sql: "SELECT count(*) FROM orders", expect: ">= 1000" });
  await agent("POST", `/v1/agent/jobs/${jobs[0].id}/finish`, {
    state: "succeeded",
    result: {
      passed: false,
      rto_seconds: 1.25,
      checks: [
        { name: "start", passed: true, output: "PostgreSQL answered its first query 1.250 s after the drill began", seconds: 1.25 },
        { name: "pg_amcheck", passed: false, output: 'heap table "postgres.public.orders", block 1, offset 3: line pointer to page offset 8000 with length 400 ends beyond maximum page offset 8192', seconds: 0.4 },
        { name: "probe: SELECT count(*) FROM orders", passed: true, output: 'got "1200", expected ">= 1000"', seconds: 0.01 },
      ],
    },
  });

  await page.reload();
  const row = page.getByRole("table", { name: "Drills" }).getByRole("row").filter({ hasText: `${a.volume}@${snap.id}` });
  await expect(row).toContainText("failed");
  await expect(row).toContainText("1.25 s");
  await expect(row).toContainText("failed: pg_amcheck");
  await row.getByText("3 checks").click();
  const checks = row.getByRole("list", { name: `Checks of drill ${jobs[0].id}` });
  await expect(checks).toContainText("ends beyond maximum page offset 8192");
  await expect(checks.getByRole("listitem").filter({ hasText: "pg_amcheck" })).toContainText("failed");
  await expect(checks.getByRole("listitem").filter({ hasText: "probe: SELECT" })).toContainText("passed");

  // Every drill, on its own page, with its application.
  await page.getByRole("link", { name: "Drills", exact: true }).click();
  const all = page.getByRole("table", { name: "Drills" });
  await expect(all.getByRole("link", { name: String(a.id), exact: true })).toBeVisible();
  // An auditor sees the reports and no button.
  await page.evaluate(() => sessionStorage.clear());
  await signIn(page, app, "audrey", `/applications/${a.id}`);
  await expect(page.getByRole("table", { name: "Drills" })).toContainText("failed");
  await expect(page.getByRole("form", { name: "Run a drill" })).toHaveCount(0);
});
