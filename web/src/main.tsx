// The console's shell: sign-in, the navigation, and the page for the path.
// An expired or revoked session sends the user to sign-in and, once signed
// in again, back to the page they were on.
import "uplot/dist/uPlot.min.css";
import "./style.css";
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { call, loadSession, login, may, saveSession, Session, setExpiredHandler } from "./api";
import { ErrorBox, Field, Link, navigate, SessionCtx, val } from "./ui";
import { Clones } from "./pages/clones";
import { Dashboard } from "./pages/dashboard";
import { Audit, Events } from "./pages/logs";
import { JobPage, Jobs } from "./pages/jobs";
import { Mounts } from "./pages/mounts";
import { Browse } from "./pages/browse";
import { Users } from "./pages/users";
import { VolumePage, Volumes } from "./pages/volumes";
import { Vms } from "./pages/vms";
import { Webhooks } from "./pages/webhooks";
import { ApplicationPage, Applications, Hosts, Policies } from "./pages/control";
import { DrillsPage } from "./pages/drills";

const NAV: [string, string, ((s: Session) => boolean)?][] = [
  ["/", "Dashboard"],
  ["/applications", "Applications"],
  ["/hosts", "Hosts"],
  ["/policies", "Policies"],
  ["/drills", "Drills"],
  ["/volumes", "Volumes"],
  ["/clones", "Clones"],
  ["/mounts", "Mounts"],
  ["/jobs", "Jobs"],
  ["/vms", "VMs"],
  ["/events", "Events"],
  ["/audit", "Audit", (s) => may(s, "audit")],
  ["/webhooks", "Webhooks"],
  ["/users", "Users and tokens"],
];

function page(path: string) {
  const p = path.split("/").filter(Boolean).map(decodeURIComponent);
  switch (p[0]) {
    case undefined:
      return <Dashboard />;
    case "volumes":
      return p[1] ? <VolumePage name={p[1]} key={p[1]} /> : <Volumes />;
    case "browse":
      return <Browse volume={p[1]} id={p[2]} key={`${p[1]}@${p[2]}`} />;
    case "clones":
      return <Clones />;
    case "hosts":
      return <Hosts />;
    case "applications":
      return p[1] ? <ApplicationPage id={p[1]} key={p[1]} /> : <Applications key={location.search} />;
    case "policies":
      return <Policies />;
    case "drills":
      return <DrillsPage />;
    case "mounts":
      return <Mounts />;
    case "jobs":
      return p[1] ? <JobPage id={p[1]} key={p[1]} /> : <Jobs />;
    case "vms":
      return <Vms />;
    case "events":
      return <Events />;
    case "audit":
      return <Audit />;
    case "webhooks":
      return <Webhooks />;
    case "users":
      return <Users />;
    default:
      return (
        <section>
          <h1>Not found</h1>
          <p>No page at {path}.</p>
        </section>
      );
  }
}

function SignIn(p: { done: (s: Session) => void; expired: boolean }) {
  const [name, setName] = useState("");
  const [pw, setPw] = useState("");
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  return (
    <main class="signin">
      <form
        aria-label="Sign in"
        onSubmit={async (e) => {
          e.preventDefault();
          setBusy(true);
          setError(null);
          try {
            p.done(await login(name, pw));
          } catch (err) {
            setError(err);
          } finally {
            setBusy(false);
          }
        }}
      >
        <h1>cdm console</h1>
        {p.expired && (
          <p class="notice" role="status">
            Your session ended. Sign in again to go on where you were.
          </p>
        )}
        <Field label="User">
          <input required autoComplete="username" value={name} onInput={(e) => setName(val(e))} name="user" />
        </Field>
        <Field label="Password">
          <input required type="password" autoComplete="current-password" value={pw} onInput={(e) => setPw(val(e))} name="password" />
        </Field>
        <button type="submit" disabled={busy}>
          Sign in
        </button>
        <ErrorBox error={error} />
      </form>
    </main>
  );
}

function App() {
  const [session, setSession] = useState<Session | null>(loadSession());
  const [expired, setExpired] = useState(false);
  const [path, setPath] = useState(location.pathname);
  useEffect(() => {
    const f = () => setPath(location.pathname);
    addEventListener("popstate", f);
    setExpiredHandler(() => {
      setSession(null);
      setExpired(true);
    });
    return () => removeEventListener("popstate", f);
  }, []);
  // A session that runs out while the page is open ends on time, not only
  // at the next refused call.
  useEffect(() => {
    if (!session?.expires) return;
    const ms = session.expires * 1000 - Date.now();
    const t = setTimeout(() => (saveSession(null), setSession(null), setExpired(true)), Math.max(0, Math.min(ms, 2 ** 31 - 1)));
    return () => clearTimeout(t);
  }, [session]);
  useEffect(() => {
    const here = NAV.find(([h]) => h === path)?.[1];
    document.title = here ? `${here} · cdm console` : "cdm console";
  }, [path]);
  if (!session) return <SignIn expired={expired} done={(s) => (setExpired(false), setSession(s))} />;
  const signOut = async () => {
    try {
      await call("POST", "/v1/logout");
    } catch {
      // The session is dropped here whatever the appliance answered.
    }
    saveSession(null);
    setSession(null);
    navigate("/");
  };
  return (
    <SessionCtx.Provider value={session}>
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header>
        <span class="brand">cdm</span>
        <nav aria-label="Main">
          {NAV.filter(([, , ok]) => !ok || ok(session)).map(([h, label]) => (
            <Link href={h} class={(h === "/" ? path === "/" : path.startsWith(h)) ? "active" : ""}>
              {label}
            </Link>
          ))}
        </nav>
        <span class="who">
          <span data-testid="who">
            {session.user} ({session.role})
          </span>{" "}
          <button type="button" onClick={signOut}>
            Sign out
          </button>
        </span>
      </header>
      <main id="main">{page(path)}</main>
    </SessionCtx.Provider>
  );
}

const root = document.getElementById("app");
if (root) {
  root.textContent = "";
  render(<App />, root);
}
