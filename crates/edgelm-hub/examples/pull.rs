//! Manual check of the real pip path: `cargo run -p edgelm-hub --release
//! --example pull -- [NAME_OR_PATH] [--force]` (default model if no name).

use edgelm_hub::{find, known_models, Hub, DEFAULT_MODEL};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let force = args.iter().any(|a| a == "--force");
    let name = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str)
        .unwrap_or(DEFAULT_MODEL);
    let run = || -> Result<(), edgelm_hub::HubError> {
        let hub = Hub::from_env()?;
        let path = match (force, find(name)) {
            (true, Some(spec)) => hub.pull(spec, true)?,
            _ => hub.resolve(name)?,
        };
        println!("{}", path.display());
        for m in hub.list()? {
            let known = known_models().iter().any(|k| k.name == m.name);
            eprintln!(
                "  {:32} {:>12} verified={} known={known}",
                m.name, m.size, m.verified
            );
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
