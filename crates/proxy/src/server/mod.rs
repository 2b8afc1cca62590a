//! The listening side: the bounded accept loop of the API port and the two routers.

pub(crate) mod routes;
pub(crate) mod serve;
