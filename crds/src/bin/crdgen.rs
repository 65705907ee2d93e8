//! Writes the StreamPipeline CRD YAML.
//!
//! `crdgen` writes `crds/streampipeline.crd.yaml` (the committed copy, which a
//! test compares with the types) and the Helm chart's copy,
//! `charts/zerodrop/files/streampipeline.crd.yaml`; `crdgen -` prints it to
//! stdout; `crdgen PATH` writes it to PATH.

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
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let paths = match target {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![
            crate_dir.join("streampipeline.crd.yaml"),
            crate_dir.join("../charts/zerodrop/files/streampipeline.crd.yaml"),
        ],
    };
    for path in paths {
        if let Err(e) = std::fs::write(&path, &yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("crdgen: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
