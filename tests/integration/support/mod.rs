//! Shared test support: the API server harness and small polling helpers.
#![allow(dead_code)]

pub mod helm;
pub mod kube_env;
pub mod proxy_env;
pub mod python;
pub mod redis;
pub mod tools;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt};
use llmproxy_api::LlmProxy;

pub use kube_env::KubeEnv;

/// The field manager tests apply with.
pub const MANAGER: &str = "llmproxy-tests";

/// A file of the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Install the LlmProxy and LlmQuota CRDs and wait until the server serves them.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [LlmProxy::crd(), llmproxy_api::LlmQuota::crd()] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
            .await
            .expect("applying the CRD");
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 30 s"))
            .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
    }
}

/// Poll `check` until it returns `Some`, failing with `what` after `timeout`. Tests wait for
/// state this way, never with fixed sleeps.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
