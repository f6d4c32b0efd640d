//! `cdmctl replication`: pairing with other appliances, peers, links and
//! their transfers (`docs/replication.md`).

use cdm_api::client::Client;
use cdm_api::replication::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum ReplicationCmd {
    /// A one-use token another appliance pairs with (`replication pair`).
    PairToken {
        /// Seconds the token stays valid (default 3600, at most 7 days).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Pair with the appliance at URL (its HTTPS API) using a token it made.
    Pair {
        /// The name this appliance gives it.
        name: String,
        url: String,
        token: String,
    },
    Peers,
    /// Forget a peer (refused while links use it); it is no longer trusted.
    Unpair {
        name: String,
    },
    #[command(subcommand)]
    Link(LinkCmd),
}

#[derive(Subcommand)]
pub(crate) enum LinkCmd {
    /// Replicate a volume (or the volumes of a protection policy) to a peer.
    Create {
        /// The peer (see `replication peers`).
        peer: String,
        #[arg(long, required_unless_present = "policy", conflicts_with = "policy")]
        volume: Option<String>,
        #[arg(long)]
        policy: Option<String>,
        /// Run every N seconds instead of after every new point.
        #[arg(long)]
        interval: Option<u64>,
        /// Retention on the target (default: the source's).
        #[arg(long)]
        keep_last: Option<u64>,
        #[arg(long)]
        keep_days: Option<u64>,
        /// MiB/s outside the windows (default unlimited).
        #[arg(long)]
        bandwidth: Option<u64>,
        /// HH:MM-HH:MM=MIBPS (UTC); repeatable.
        #[arg(long = "window")]
        windows: Vec<String>,
        #[arg(long)]
        rpo: Option<u64>,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
        /// Send encrypted volumes as ciphertext: the peer stores them
        /// sealed and needs no key (default: it re-encrypts with its own).
        #[arg(long)]
        raw: bool,
    },
    List,
    Show {
        id: u64,
    },
    Pause {
        id: u64,
    },
    Resume {
        id: u64,
    },
    Delete {
        id: u64,
    },
    /// Run it now (a `replicate` job; `job wait ID` follows it).
    Run {
        id: u64,
    },
    /// Its transfers, newest first.
    Transfers {
        id: u64,
    },
}

pub(crate) fn run(cmd: ReplicationCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        ReplicationCmd::PairToken { ttl } => {
            let t = c.create_pairing(&PairingCreate { ttl_seconds: ttl })?;
            out.show(&t, |t| {
                format!(
                    "token: {}\nexpires: {}\non the other appliance: cdmctl replication pair NAME https://THIS-APPLIANCE:PORT {}\n",
                    t.token, t.expires_at, t.token
                )
            });
        }
        ReplicationCmd::Pair { name, url, token } => {
            let p = c.create_peer(&PeerCreate { name, url, token })?;
            out.show(&p, |p| format!("paired with {} ({})\n", p.name, p.identity));
        }
        ReplicationCmd::Peers => out.show(&c.peers()?, |v| peers_table(v)),
        ReplicationCmd::Unpair { name } => {
            c.delete_peer(&name)?;
            out.say(format!("peer {name} unpaired"));
        }
        ReplicationCmd::Link(l) => link(l, c, out)?,
    }
    Ok(())
}

fn link(cmd: LinkCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        LinkCmd::Create {
            peer,
            volume,
            policy,
            interval,
            keep_last,
            keep_days,
            bandwidth,
            windows,
            rpo,
            paused,
            raw,
        } => {
            let l = c.create_link(&LinkCreate {
                volume,
                policy,
                peer,
                schedule: interval.map(|i| LinkSchedule::Interval {
                    interval_seconds: i,
                }),
                keep_last,
                keep_days,
                bandwidth_mibps: bandwidth,
                bandwidth_windows: windows,
                rpo_seconds: rpo,
                enabled: Some(!paused),
                raw: raw.then_some(true),
            })?;
            out.show(&l, link_show);
        }
        LinkCmd::List => out.show(&c.links()?, |v| links_table(v)),
        LinkCmd::Show { id } => out.show(&c.link(id)?, link_show),
        LinkCmd::Pause { id } => out.show(&c.pause_link(id)?, link_show),
        LinkCmd::Resume { id } => out.show(&c.resume_link(id)?, link_show),
        LinkCmd::Delete { id } => {
            c.delete_link(id)?;
            out.say(format!("link {id} deleted"));
        }
        LinkCmd::Run { id } => {
            let j = c.run_link(id)?;
            out.show(&j, |j| format!("job {} started\n", j.id));
        }
        LinkCmd::Transfers { id } => out.show(&c.transfers(id)?, |v| transfers_table(v)),
    }
    Ok(())
}

fn schedule(s: &LinkSchedule) -> String {
    match s {
        LinkSchedule::Named(n) => n.clone(),
        LinkSchedule::Interval { interval_seconds } => format!("every {interval_seconds}s"),
    }
}

fn peers_table(v: &[Peer]) -> String {
    table_of(
        v,
        &["NAME", "IDENTITY", "ENDPOINT", "URL", "PAIRED (UTC)"],
        |p| {
            vec![
                p.name.clone(),
                p.identity.clone(),
                opt(&p.replication_endpoint),
                opt(&p.url),
                time(p.paired_unix),
            ]
        },
    )
}

fn links_table(v: &[Link]) -> String {
    table_of(
        v,
        &[
            "ID", "SOURCE", "PEER", "SCHEDULE", "STATE", "LAG (s)", "RPO (s)",
        ],
        |l| {
            vec![
                l.id.to_string(),
                l.volume
                    .clone()
                    .or(l.policy.as_ref().map(|p| format!("policy {p}")))
                    .unwrap_or_default(),
                l.peer.clone(),
                schedule(&l.schedule),
                l.state.clone(),
                opt(&l.lag_seconds),
                l.rpo_seconds.to_string(),
            ]
        },
    )
}

fn link_show(l: &Link) -> String {
    format!(
        "id: {}\nvolume: {}\npolicy: {}\npeer: {}\nraw: {}\nschedule: {}\nkeep last: {}\nkeep days: {}\nbandwidth (MiB/s): {}\nwindows: {}\nrpo (s): {}\nstate: {}\nlag (s): {}\nlast error: {}\n",
        l.id,
        opt(&l.volume),
        opt(&l.policy),
        l.peer,
        l.raw,
        schedule(&l.schedule),
        opt(&l.keep_last),
        opt(&l.keep_days),
        opt(&l.bandwidth_mibps),
        l.bandwidth_windows.join(","),
        l.rpo_seconds,
        l.state,
        opt(&l.lag_seconds),
        opt(&l.last_error),
    )
}

fn transfers_table(v: &[Transfer]) -> String {
    table_of(
        v,
        &[
            "ID",
            "VOLUME",
            "SNAPSHOT",
            "FULL",
            "RAW",
            "STARTED (UTC)",
            "SECONDS",
            "SENT",
            "CHANGED",
            "RESULT",
            "MESSAGE",
        ],
        |t| {
            vec![
                t.id.to_string(),
                t.volume.clone(),
                t.snapshot.to_string(),
                t.full.to_string(),
                t.raw.to_string(),
                time(t.started_unix),
                format!("{:.1}", t.seconds),
                t.bytes_sent.to_string(),
                t.bytes_logical.to_string(),
                t.result.clone(),
                t.message.clone(),
            ]
        },
    )
}
