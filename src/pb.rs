//! Generated protobuf and gRPC code. Only the `api` module uses these types.

#![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
#![allow(clippy::all, clippy::pedantic)]

/// Tollgate's own API, `tollgate.v1`.
pub mod tollgate {
    pub mod v1 {
        tonic::include_proto!("tollgate.v1");
    }
}

/// The encoded file descriptors of `tollgate.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tollgate_descriptor");

/// The encoded file descriptors of Envoy's `envoy.service.ratelimit.v3`
/// and `envoy.service.rate_limit_quota.v3`, for server reflection only:
/// the services themselves run on `envoy-types`' generated code (see
/// `reflection/README.md`).
pub const ENVOY_RLS_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("envoy_rls_descriptor");
