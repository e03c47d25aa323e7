//! Code generation for `proto/` and nothing else; and the descriptors of
//! Envoy's RLS v3 and RLQS from `reflection/`, for server reflection only.

fn main() -> anyhow::Result<()> {
    let protos = [
        "proto/tollgate/v1/tollgate.proto",
        "proto/tollgate/v1/admin.proto",
        "proto/tollgate/v1/leases.proto",
    ];
    let files = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tollgate_descriptor.bin"),
        prost::Message::encode_to_vec(&files),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(files)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // `envoy-types` serves the RLS and RLQS but exports no descriptors;
    // these files describe their messages for reflection (see
    // reflection/README.md).
    let rls = protox::compile(
        [
            "envoy/service/ratelimit/v3/rls.proto",
            "envoy/service/rate_limit_quota/v3/rlqs.proto",
        ],
        ["reflection"],
    )?;
    std::fs::write(
        out.join("envoy_rls_descriptor.bin"),
        prost::Message::encode_to_vec(&rls),
    )?;
    println!("cargo:rerun-if-changed=reflection");
    Ok(())
}
