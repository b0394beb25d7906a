//! Writes the hand-made seeds of the fuzz corpus (`fuzz/corpus/TARGET/seed-*`): for the MMIO
//! targets, a driver's whole device set-up, for the FUSE session a few requests that reach
//! the tree, and for the snapshot decoder a whole state
//! payload, which a fuzzer starting from nothing would take long to find. `scripts/fuzz`
//! runs it; the seeds are also committed.
fn main() {
    // The MMIO targets, each with the queues its device has.
    let mmio = [
        ("mmio_balloon", 2),
        ("mmio_block", 1),
        ("mmio_net", 2),
        ("mmio_vsock", 3),
        ("mmio_fs", 2),
    ]
    .map(|(target, queues)| {
        (
            target,
            "seed-driver-setup",
            shoal_vmm::fuzz::mmio_seed(queues),
        )
    });
    let seeds = mmio.into_iter().chain([
        ("fuse_session", "seed-session", shoal_vmm::fuzz::fuse_seed()),
        (
            "snapshot_state",
            "seed-whole-state",
            shoal_vmm::fuzz::snapshot_seed(),
        ),
    ]);
    for (target, name, seed) in seeds {
        let dir = shoal_vmm::fuzz::corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(name), seed).expect("seed");
    }
}
