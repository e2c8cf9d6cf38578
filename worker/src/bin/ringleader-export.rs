//! `ringleader-export`: writes a trained trial's model out of Ringleader.
//! `ringleader model export` runs it (it needs libtorch, which only the
//! worker crate links) with the trial's record on stdin; see
//! docs/MODELS.md.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use ringleader_worker::confine::RootArgs;
use ringleader_worker::train::export::{self, ExportRequest, CARD_FILE};

/// The request is a job spec (at most 256 KiB as submitted) and one
/// trial's record (at most 1 MiB): this leaves room.
const MAX_REQUEST_BYTES: u64 = 4 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "ringleader-export",
    version,
    about = "Export a trial's trained model (run by `ringleader model export`)"
)]
struct Args {
    /// Directory to write model.pt, model.safetensors and model.json
    /// into: new, or empty.
    #[arg(long)]
    out: PathBuf,

    /// Checkpoints are read, and data sets and TorchScript modules opened,
    /// only under these roots, as a worker would.
    #[command(flatten)]
    roots: RootArgs,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(MAX_REQUEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .context("reading the request on stdin")?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_REQUEST_BYTES,
        "the request on stdin is over {MAX_REQUEST_BYTES} bytes"
    );
    let request: ExportRequest =
        serde_json::from_slice(&bytes).context("the request on stdin is not an export request")?;
    let confinement = args.roots.confinement()?;
    let card = export::export(&request, &args.out, &confinement)?;
    println!("wrote {}", args.out.display());
    if let Some(check) = card.get("check").filter(|c| !c.is_null()) {
        println!(
            "  checked on the test split: {} of {} predictions match the trained model (accuracy {})",
            check["examples"], check["examples"], check["accuracy"]
        );
    }
    println!("  {}", args.out.join(CARD_FILE).display());
    Ok(())
}
