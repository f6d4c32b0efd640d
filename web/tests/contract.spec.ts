// The console's API types are generated from the running snapshotd's
// OpenAPI document: if the API changes and web/src/openapi.ts is not
// regenerated (and the console not rechecked), this fails.
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { expect, ROOT, signIn, test } from "./appliance";

test("web/src/openapi.ts matches the running snapshotd's /v1/openapi.json", async ({ app }) => {
  const out = execFileSync("node", [join(ROOT, "web/gen-api.mjs"), "--check"], {
    env: { ...process.env, CDM_API: app.url, CDM_TOKEN: app.admin },
    stdio: ["ignore", "pipe", "pipe"],
  }).toString();
  expect(out).toContain("matches");
});

test("the console is served without a token, the API is not", async ({ app }) => {
  const index = await fetch(app.url + "/volumes/anything");
  expect(index.status).toBe(200);
  expect(index.headers.get("content-security-policy")).toContain("script-src 'self'");
  expect(await index.text()).toContain('<div id="app">');
  const api = await fetch(app.url + "/v1/volumes");
  expect(api.status).toBe(401);
  const missing = await fetch(app.url + "/v1/no-such-route", { headers: { Authorization: `Bearer ${app.admin}` } });
  expect(missing.status).toBe(404);
});

test("the snapshot list pages: the API by limit/offset, the volume page by Newer/Older", async ({ page, app }) => {
  await app.api("POST", "/v1/volumes", { name: "paged", size: 1 << 26 });
  for (let i = 0; i < 120; i++) await app.api("POST", "/v1/volumes/paged/snapshots", { label: `p${i}` });
  const r = await fetch(`${app.url}/v1/volumes/paged/snapshots?limit=2&offset=1&newest_first=true`, {
    headers: { Authorization: `Bearer ${app.admin}` },
  });
  expect(r.headers.get("x-total-count")).toBe("120");
  expect(((await r.json()) as { label: string }[]).map((s) => s.label)).toEqual(["p118", "p117"]);
  await signIn(page, app);
  await page.goto(`${app.url}/volumes/paged`);
  const pager = page.getByRole("navigation", { name: "Snapshot pages" });
  await expect(pager).toContainText("1–100 of 120");
  await expect(page.getByRole("cell", { name: "p119", exact: true })).toBeVisible();
  await expect(page.getByRole("cell", { name: "p0", exact: true })).toHaveCount(0);
  await pager.getByRole("button", { name: "Older" }).click();
  await expect(pager).toContainText("101–120 of 120");
  await expect(page.getByRole("cell", { name: "p0", exact: true })).toBeVisible();
});
