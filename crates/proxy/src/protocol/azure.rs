//! Azure OpenAI's paths: `/openai/deployments/{deployment}/chat/completions?api-version=...`
//! (the deployment is the model) and `/openai/v1/...`. Read into the operation OpenAI's path
//! names, so that charging, caching and usage treat both APIs alike, and the query cut down to
//! the one parameter Azure takes.

/// The operation an Azure path asks for and the deployment it names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Route<'a> {
    /// What OpenAI calls the same operation after `/v1` (`/chat/completions`).
    pub(crate) operation: &'a str,
    /// The deployment of a `/openai/deployments/{deployment}/...` path, still percent-encoded.
    pub(crate) deployment: Option<&'a str>,
}

/// Read a path under `/openai/`; `None` for any other.
pub(crate) fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/openai")?;
    if let Some(after) = rest.strip_prefix("/deployments/") {
        let (deployment, operation) =
            after.split_once('/').map_or((after, ""), |(d, _)| (d, &after[d.len()..]));
        return Some(Route { operation, deployment: Some(deployment) });
    }
    Some(Route { operation: rest.strip_prefix("/v1").unwrap_or(rest), deployment: None })
}

/// The query sent to Azure: `api-version` and nothing else (a parameter the proxy does not know
/// could change what the key is used for). An error names the parameter refused.
pub(crate) fn query(query: Option<&str>) -> Result<String, String> {
    let Some(query) = query.filter(|q| !q.is_empty()) else { return Ok(String::new()) };
    let mut version = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, _) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "api-version" {
            return Err(format!(
                "query parameter {name:?} is not passed to Azure OpenAI: llmproxy passes api-version only"
            ));
        }
        if version.replace(pair).is_some() {
            return Err("api-version is given twice".to_owned());
        }
    }
    Ok(version.map(|v| format!("?{v}")).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_paths_name_the_model_and_the_operation() {
        let r = route("/openai/deployments/gpt-4o-prod/chat/completions");
        assert_eq!(r, Some(Route { operation: "/chat/completions", deployment: Some("gpt-4o-prod") }));
        let r = route("/openai/deployments/emb/embeddings");
        assert_eq!(r, Some(Route { operation: "/embeddings", deployment: Some("emb") }));
        assert_eq!(
            route("/openai/v1/chat/completions"),
            Some(Route { operation: "/chat/completions", deployment: None })
        );
        assert_eq!(route("/openai/deployments/x"), Some(Route { operation: "", deployment: Some("x") }));
        assert_eq!(route("/v1/chat/completions"), None);
    }

    #[test]
    fn only_api_version_is_passed() {
        assert_eq!(query(Some("api-version=2024-10-21")), Ok("?api-version=2024-10-21".into()));
        assert_eq!(query(None), Ok(String::new()));
        assert_eq!(query(Some("")), Ok(String::new()));
        let refused = query(Some("api-version=1&x-ms-debug=1"));
        assert!(refused.is_err_and(|e| e.contains("x-ms-debug")));
        assert!(query(Some("api-version=1&api-version=2")).is_err());
    }
}
