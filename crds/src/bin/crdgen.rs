//! Writes the StreamPipeline CRD YAML.
//!
//! `crdgen` writes `crds/streampipeline.crd.yaml` (the committed copy, which a
//! test compares with the types); `crdgen -` prints it to stdout; `crdgen PATH`
//! writes it to PATH.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match zerodrop_crds::crd_yaml() {
        Ok(yaml) => yaml,
        Err(e) => {
            eprintln!("crdgen: cannot serialize the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = std::env::args_os().nth(1);
    if target.as_deref() == Some("-".as_ref()) {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let path = target.map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("streampipeline.crd.yaml")
    });
    match std::fs::write(&path, yaml) {
        Ok(()) => {
            eprintln!("crdgen: wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
