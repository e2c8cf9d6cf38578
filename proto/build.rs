fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // Undecodable requests are the sender's error (see src/codec.rs).
        .codec_path("crate::codec::ProstCodecChecked")
        // Ring payloads are sliced and forwarded without copies.
        .bytes(".ringleader.collective.v1.RingFrame.payload")
        .compile_protos(
            &["proto/coordinator.proto", "proto/collective.proto"],
            &["proto"],
        )?;
    Ok(())
}
