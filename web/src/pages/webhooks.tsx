// Webhooks and their delivery log.
import { useState } from "preact/hooks";
import { call, get, may, S } from "../api";
import { Confirm, ErrorBox, Field, Table, useAction, useLoad, useSession, val, when } from "../ui";

export function Webhooks() {
  const s = useSession();
  const list = useLoad(() => get<S["Webhook"][]>("/v1/webhooks"), []);
  const a = useAction();
  const [url, setUrl] = useState("");
  const [events, setEvents] = useState("*");
  const [secret, setSecret] = useState<string | null>(null);
  const [open, setOpen] = useState<number | null>(null);
  return (
    <section>
      <h1>Webhooks</h1>
      <ErrorBox error={list.error || a.error} />
      {may(s, "write") && (
        <form
          class="form"
          aria-label="Create a webhook"
          onSubmit={(e) => {
            e.preventDefault();
            const body: S["WebhookCreate"] = { url, events: events.split(/[\s,]+/).filter(Boolean) };
            a.run(async () => setSecret((await call<S["Webhook"]>("POST", "/v1/webhooks", body)).secret ?? null), () => (setUrl(""), list.reload()));
          }}
        >
          <Field label="Receiver URL">
            <input required value={url} onInput={(e) => setUrl(val(e))} name="url" />
          </Field>
          <Field label="Events (space separated)">
            <input value={events} onInput={(e) => setEvents(val(e))} name="events" />
          </Field>
          <button type="submit">Add webhook</button>
        </form>
      )}
      {secret && (
        <div class="notice" role="status">
          Signing secret: <code>{secret}</code> — copy it now, it is not shown again.
        </div>
      )}
      <Table
        label="Webhooks"
        rows={list.data}
        cols={[
          { key: "id", label: "Id", value: (w) => w.id, num: true },
          { key: "url", label: "URL", value: (w) => w.url },
          { key: "events", label: "Events", value: (w) => w.events.join(" ") },
          { key: "created", label: "Created", value: (w) => w.created_unix, render: (w) => when(w.created_unix) },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (w) => (
              <span class="row-actions">
                <button type="button" onClick={() => setOpen(w.id)}>
                  Deliveries
                </button>
                {may(s, "write") && <Confirm label="Delete" danger onConfirm={() => a.run(() => call("DELETE", `/v1/webhooks/${w.id}`), list.reload)} />}
              </span>
            ),
          },
        ]}
      />
      {open !== null && <Deliveries id={open} />}
    </section>
  );
}

function Deliveries({ id }: { id: number }) {
  const list = useLoad(() => get<S["Delivery"][]>(`/v1/webhooks/${id}/deliveries`), [id], 5_000);
  return (
    <>
      <h2>Deliveries of webhook {id}</h2>
      <ErrorBox error={list.error} />
      <Table
        label={`Deliveries of webhook ${id}`}
        rows={list.data}
        cols={[
          { key: "id", label: "Id", value: (d) => d.id, num: true },
          { key: "event", label: "Event", value: (d) => `${d.event_type} #${d.event}` },
          { key: "state", label: "State", value: (d) => d.state },
          { key: "attempts", label: "Attempts", value: (d) => d.attempts, num: true },
          { key: "status", label: "Last status", value: (d) => d.last_status ?? "" },
          { key: "error", label: "Last error", value: (d) => d.last_error ?? "" },
          { key: "updated", label: "Updated", value: (d) => d.updated_unix, render: (d) => when(d.updated_unix) },
        ]}
      />
    </>
  );
}
