//! Integration tests against real servers: a Kubernetes API server (etcd + kube-apiserver-lite
//! or the official binary) started per test by `support::KubeEnv`.

// This crate is test code throughout, helpers included; clippy.toml's allow-*-in-tests covers
// only #[test] functions, so the helpers get the same allowance here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod anthropic;
mod cache;
mod chart;
mod clients;
mod connections;
mod consent;
mod crd;
mod operator;
mod prometheus;
mod providers;
mod proxy;
mod proxy_process;
mod shared;
mod support;
mod tls;
mod tokens;
mod upstreams;
