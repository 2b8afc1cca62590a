//! The mock's accept loop. Each connection carries a kill switch in its requests' extensions so a
//! handler can drop the connection without answering, as a crashed upstream would.

use std::sync::Arc;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::Mock;
use crate::handlers::Kill;

pub(crate) async fn serve(listener: tokio::net::TcpListener, mock: Arc<Mock>, stop: CancellationToken) {
    let router = crate::handlers::router(Arc::clone(&mock));
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mock upstream: accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        crate::lock(&mock.stats).connections += 1;
        let max_streams = crate::lock(&mock.config).http2_max_streams;
        let kill = CancellationToken::new();
        let router = router.clone();
        let conn_kill = kill.clone();
        let early_mock = Arc::clone(&mock);
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(Kill(conn_kill.clone()));
            if req.version() == http::Version::HTTP_2 {
                crate::lock(&early_mock.stats).http2_requests += 1;
            }
            let mut router = router.clone();
            let early = early_mock.take_early();
            async move {
                if let Some(status) = early {
                    return Ok(crate::handlers::early(status));
                }
                router.call(req.map(Body::new)).await
            }
        });
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            if let Some(n) = max_streams {
                builder.http2().max_concurrent_streams(n);
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = kill.cancelled() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}
