// The console's API types are generated from the running snapshotd's
// OpenAPI document: if the API changes and web/src/openapi.ts is not
// regenerated (and the console not rechecked), this fails.
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { expect, ROOT, test } from "./appliance";

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
