//! Helpers shared by the VMM's integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

/// A per-test directory under the system temp dir, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(prefix: &str, name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("shoal-{prefix}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Restores one VM per name from `files`, all at once (one thread each), with the console
/// of each in `dir/NAME`; the sizes are what the restores ask for.
pub fn restore_side_by_side(
    files: &shoal_vmm::SnapshotFiles,
    dir: &Scratch,
    names: &[&str],
    memory_mib: u64,
    vcpus: u8,
) -> Vec<shoal_vmm::Vm> {
    std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let config = shoal_vmm::RestoreConfig {
                    files: files.clone(),
                    console: shoal_vmm::Console::File(dir.path(name)),
                    memory_mib: Some(memory_mib),
                    vcpus: Some(vcpus),
                    vsock: None,
                    shares: Vec::new(),
                    free_page_reporting: false,
                    limits: Default::default(),
                };
                s.spawn(move || shoal_vmm::Vm::restore(&config).expect("restore"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
