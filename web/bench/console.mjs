// Figures of the web console (scripts/bench-web): the bundle's gzipped
// size, first contentful paint of the sign-in page on loopback, and the
// dashboard's load time on a pool with VOLUMES volumes and SNAPSHOTS
// snapshots (made through the API: snapshots of empty volumes are cheap).
// Prints one JSON object.
import { chromium } from "@playwright/test";
import { readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const url = process.env.CDM_API;
const token = process.env.CDM_TOKEN;
const volumes = Number(process.env.VOLUMES ?? 1000);
const snapshots = Number(process.env.SNAPSHOTS ?? 100000);
const parallel = Number(process.env.PARALLEL ?? 8);
if (!url || !token) throw new Error("CDM_API and CDM_TOKEN name the snapshotd to measure");

const dist = join(here, "../dist");
const index = readFileSync(join(dist, "index.html"), "utf8");
const refs = [...index.matchAll(/"\/(assets\/app-[^"]+)"/g)].map((m) => m[1]);
const gz = ["index.html", ...refs].reduce((n, f) => n + statSync(join(dist, f + ".gz")).size, 0);
const br = ["index.html", ...refs].reduce((n, f) => n + statSync(join(dist, f + ".br")).size, 0);

async function api(method, path, body) {
  const r = await fetch(url + path, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${await r.text()}`);
  return r.status === 204 ? undefined : r.json();
}

/** Runs `f(i)` for i in [0, n) with `parallel` requests in flight. */
async function many(n, f) {
  let next = 0;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < n) await f(next++);
    }),
  );
}

const t0 = performance.now();
const have = (await api("GET", "/v1/pool")).volumes;
await many(Math.max(0, volumes - have), (i) => api("POST", "/v1/volumes", { name: `bench-${have + i}`, size: 1 << 30 }));
const pool = await api("GET", "/v1/pool");
await many(Math.max(0, snapshots - pool.snapshots), (i) => api("POST", `/v1/volumes/bench-${i % volumes}/snapshots`, { label: `b${i}` }));
const setupS = (performance.now() - t0) / 1000;
const want = (await api("GET", "/v1/pool")).snapshots;

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
await page.goto(url + "/");
await page.getByRole("button", { name: "Sign in" }).waitFor();
const fcp = await page.evaluate(() => performance.getEntriesByName("first-contentful-paint")[0]?.startTime ?? null);

// Signed in as the admin token, then a cold load of the dashboard, timed
// from navigation start until the pool's counts and the job tables show.
await page.evaluate((t) => sessionStorage.setItem("cdm.session", JSON.stringify({ token: t, user: "admin", role: "admin", grants: [], expires: null })), token);
const runs = [];
for (let i = 0; i < 5; i++) {
  await page.goto(url + "/");
  await page.getByTestId("snapshot-count").filter({ hasText: String(want) }).waitFor({ timeout: 60_000 });
  await page.getByRole("table", { name: "Failed jobs" }).getByRole("row").nth(1).waitFor();
  runs.push(await page.evaluate(() => performance.now()));
}
await browser.close();
runs.sort((a, b) => a - b);
console.log(
  JSON.stringify(
    {
      bundle_gzip_bytes: gz,
      bundle_brotli_bytes: br,
      first_contentful_paint_ms: fcp === null ? null : Math.round(fcp),
      volumes,
      snapshots: want,
      setup_s: Math.round(setupS),
      dashboard_load_ms_median: Math.round(runs[2]),
      dashboard_load_ms_max: Math.round(runs[4]),
    },
    null,
    2,
  ),
);
