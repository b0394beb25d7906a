//! `shoal-template`: makes the VM template that sandboxes of one size restore instead of
//! booting (`template = true` in the shoal config). `scripts/template` runs it.
//!
//! ```text
//! shoal-template [--config FILE] [--memory-mib N] [--vcpus N] [--kernel FILE]
//!                [--image FILE] [--dir DIR]
//! ```
//! The kernel, image, command line and devices come from the shoal config (`--config`, else
//! `$SHOAL_CONFIG`, else /etc/shoal/config.toml, else the defaults); the size, kernel, image
//! and template directory from it unless given (a template made from another kernel or
//! image than the shim's config names is refused by the shim). Prints the template's
//! directory.
use std::path::PathBuf;

use anyhow::{bail, Context};
use containerd_shim_shoal_v2::config::Config;
use containerd_shim_shoal_v2::template;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(shoal_vmm::ratelimit::log_filter("warn"))
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "shoal-template: {}",
                shoal_vmm::report::one_line(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut config_path, mut memory_mib, mut vcpus, mut dir) = (None, None, None, None);
    let (mut kernel, mut image) = (None, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--config" => config_path = Some(PathBuf::from(value()?)),
            "--memory-mib" => {
                let v = value()?;
                memory_mib = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|m| *m >= 64)
                        .with_context(|| {
                            format!("--memory-mib {v:?}: expected MiB, at least 64")
                        })?,
                )
            }
            "--vcpus" => {
                let v = value()?;
                vcpus = Some(
                    v.parse::<u8>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .with_context(|| {
                            format!("--vcpus {v:?}: expected a number of vCPUs from 1 to 64")
                        })?,
                )
            }
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--image" => image = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("usage: shoal-template [--config FILE] [--memory-mib N] [--vcpus N] [--kernel FILE] [--image FILE] [--dir DIR]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let mut config = match config_path {
        Some(path) => Config::from_file(&path)?,
        None => Config::load()?,
    };
    shoal_vmm::confine::set_mode(config.confine_mode());
    config.memory_mib = memory_mib.unwrap_or(config.memory_mib);
    config.vcpus = vcpus.unwrap_or(config.vcpus);
    config.kernel = kernel.unwrap_or(config.kernel);
    config.initrd = image.unwrap_or(config.initrd);
    if let Some(dir) = dir {
        config.template_dir = dir;
    }
    for (what, path) in [("kernel", &config.kernel), ("image", &config.initrd)] {
        if !path.is_file() {
            bail!(
                "guest {what} {} not found (set it in the shoal config, pass --{what}, or run scripts/install)",
                path.display()
            );
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let made = runtime.block_on(template::create(&config))?;
    println!("{}", made.display());
    Ok(())
}
