// Events and the audit log: newest first, paged by id (`after`), filtered
// by type or user on the server and by any text in the table.
import { useState } from "preact/hooks";
import { get, may, S } from "../api";
import { ErrorBox, Field, Table, useLoad, useSession, val, when } from "../ui";

export function Events() {
  const [type, setType] = useState("");
  const [limit, setLimit] = useState(200);
  const q = `/v1/events?limit=${limit}${type ? `&type=${encodeURIComponent(type)}` : ""}`;
  const list = useLoad(() => get<S["Event"][]>(q), [q], 10_000);
  return (
    <section>
      <h1>Events</h1>
      <Field label="Type (e.g. snapshot.* or alert.raised)">
        <input value={type} onChange={(e) => setType(val(e))} name="type" />
      </Field>
      <ErrorBox error={list.error} />
      <Table
        label="Events"
        rows={list.data ? [...list.data].reverse() : null}
        cols={[
          { key: "id", label: "Id", value: (e) => e.id, num: true },
          { key: "time", label: "Time", value: (e) => e.time_unix, render: (e) => when(e.time_unix) },
          { key: "type", label: "Type", value: (e) => e.type },
          { key: "subject", label: "Subject", value: (e) => e.subject },
          { key: "actor", label: "Actor", value: (e) => e.actor },
          { key: "data", label: "Data", value: (e) => JSON.stringify(e.data), render: (e) => <code>{JSON.stringify(e.data)}</code> },
        ]}
      />
      {list.data && list.data.length >= limit && (
        <button type="button" onClick={() => setLimit(Math.min(10_000, limit * 2))}>
          Show more
        </button>
      )}
    </section>
  );
}

export function Audit() {
  const s = useSession();
  const [limit, setLimit] = useState(200);
  const list = useLoad(() => get<S["AuditEntry"][]>(`/v1/audit?limit=${limit}`), [limit]);
  if (!may(s, "audit")) return <section><h1>Audit log</h1><p>Only admins and auditors read the audit log.</p></section>;
  return (
    <section>
      <h1>Audit log</h1>
      <ErrorBox error={list.error} />
      <Table
        label="Audit log"
        rows={list.data ? [...list.data].reverse() : null}
        cols={[
          { key: "id", label: "Id", value: (e) => e.id, num: true },
          { key: "time", label: "Time", value: (e) => e.time_unix, render: (e) => when(e.time_unix) },
          { key: "user", label: "User", value: (e) => e.user },
          { key: "token", label: "Token", value: (e) => e.token },
          { key: "method", label: "Method", value: (e) => e.method },
          { key: "path", label: "Path", value: (e) => e.path },
          { key: "status", label: "Status", value: (e) => e.status, num: true },
        ]}
      />
      {list.data && list.data.length >= limit && (
        <button type="button" onClick={() => setLimit(Math.min(10_000, limit * 2))}>
          Show more
        </button>
      )}
    </section>
  );
}
