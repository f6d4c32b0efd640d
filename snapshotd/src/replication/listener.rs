//! The replication listener (`--replication ADDR`): HTTPS with the
//! appliance's server certificate that requires a client certificate
//! chaining to a paired peer's CA ([`super::peers::PeerVerifier`]); each
//! request then names its peer by the certificate's SHA-256 pinned at
//! pairing, or is refused with 403 `unpaired`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::{Extension, Json, Router};
use cdm_api::replication::WhoAmI;
use cdm_api::ApiError;

use super::http::PeerId;
use super::peers::{PeerVerifier, Trust};
use super::receive::ReceiverCtx;
use super::service::Replication;
use crate::tls::{HttpsListener, Material, TlsError};

/// A connection of the listener: its address and the client certificate
/// its handshake verified.
#[derive(Clone, Debug)]
pub struct ReplConn {
    pub addr: SocketAddr,
    pub cert: Option<Vec<u8>>,
}

impl Connected<IncomingStream<'_, HttpsListener>> for ReplConn {
    fn connect_info(s: IncomingStream<'_, HttpsListener>) -> Self {
        let (_, conn) = s.io().get_ref();
        ReplConn {
            addr: *s.remote_addr(),
            cert: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
        }
    }
}

/// The listener's TLS configuration (its verifier follows `trust`).
pub fn tls_config(m: &Material, trust: &Arc<Trust>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    crate::tls::replication_config(m, Arc::new(PeerVerifier(trust.clone())))
}

/// Names the caller by its certificate, or refuses it. The verifier
/// already refused certificates of unknown CAs; this also refuses a
/// certificate of a paired CA that is not the peer's pinned one, and a
/// peer unpaired while its connection stayed open.
async fn identify(State(trust): State<Arc<Trust>>, mut req: Request, next: Next) -> Response {
    let conn = req.extensions().get::<ConnectInfo<ReplConn>>().cloned();
    let known = conn
        .as_ref()
        .and_then(|c| c.0.cert.as_deref())
        .and_then(|der| trust.peer_of(der));
    let Some(k) = known else {
        let addr = conn.map(|c| c.0.addr.to_string()).unwrap_or_default();
        tracing::warn!(%addr, "replication request from an unpaired client refused");
        return ApiError::new(
            403,
            "unpaired",
            "this client certificate belongs to no paired appliance",
        )
        .into_response();
    };
    req.extensions_mut().insert(k);
    next.run(req).await
}

/// `GET /repl/whoami`: how this appliance knows the caller.
async fn whoami(
    State(rep): State<Arc<Replication>>,
    Extension(k): Extension<PeerId>,
) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: rep.name.clone(),
        identity: rep.identity.clone(),
        peer: k.name,
        peer_identity: k.identity,
    })
}

/// Every route of the listener (the receiver's `/repl/v1` and
/// `/repl/whoami`), behind [`identify`].
pub fn router(rep: Arc<Replication>) -> Router {
    let trust = rep.trust.clone();
    let weak = Arc::downgrade(&rep);
    let ctx = Arc::new(ReceiverCtx {
        pool: rep.pool.clone(),
        state: rep.state.clone(),
        identity: rep.identity.clone(),
        // A received point starts the links that replicate it on (A→B→C).
        on_point: Arc::new(move |volume: &str, _snapshot: u64| {
            if let Some(r) = weak.upgrade() {
                r.point_received(volume);
            }
        }),
        events: rep.events.clone(),
        held: {
            let weak = Arc::downgrade(&rep);
            Arc::new(move || {
                let r = weak.upgrade()?;
                r.holds()
                    .map_err(|e| tracing::error!(error = %e.message, "replication holds"))
                    .ok()
            })
        },
        answered: Default::default(),
        compression: rep.compression,
    });
    Router::new()
        .route("/repl/whoami", get(whoami))
        .with_state(rep)
        .merge(super::receive::router(ctx))
        .layer(middleware::from_fn_with_state(trust, identify))
}

/// Serves `router` on `l` until `stop` ends. Runs inside a tokio runtime.
pub async fn serve(
    l: std::net::TcpListener,
    cfg: Arc<rustls::ServerConfig>,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let l = HttpsListener::new(tokio::net::TcpListener::from_std(l)?, cfg)?;
    let svc = router.into_make_service_with_connect_info::<ReplConn>();
    axum::serve(l, svc).with_graceful_shutdown(stop).await
}
