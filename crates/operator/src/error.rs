//! Why a reconcile failed, with a low-cardinality label for metrics.

/// Why a reconcile failed; transient, retried with back-off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Cluster-scoped LlmProxy objects do not exist; seen only with a broken CRD.
    #[error("LlmProxy has no namespace")]
    NoNamespace,
}

impl Error {
    /// Every value `metric_label` returns.
    pub(crate) const LABELS: [&'static str; 5] =
        ["conflict", "forbidden", "api_error", "api_unreachable", "no_namespace"];

    /// A low-cardinality label for the failure metric.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "api_unreachable",
            Error::NoNamespace => "no_namespace",
        }
    }
}
