//! The listening side: the bounded accept loop of the API port and the two routers.

pub mod routes;
pub mod serve;
