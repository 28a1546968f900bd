//! NBD (Network Block Device): the wire format ([`proto`]), the transports
//! ([`transport`]), TLS ([`tls`]), the `nbd` protocol driver ([`client`]) and the export
//! server's per-connection state machine ([`server`]). Message parsing
//! lives in `proto` only, shared by client and server.

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transport;
pub mod uri;
