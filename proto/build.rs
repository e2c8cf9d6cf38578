fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // Ring payloads are sliced and forwarded without copies.
        .bytes(".ringleader.collective.v1.RingFrame.payload")
        .compile_protos(
            &["proto/coordinator.proto", "proto/collective.proto"],
            &["proto"],
        )?;
    Ok(())
}
