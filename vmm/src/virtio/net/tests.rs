//! The device against a real tap in a network namespace of the test's own: frames the "guest"
//! queues reach a UDP socket on the host side, and datagrams sent from the host side land in
//! the guest's receive buffers. Needs root and /dev/net/tun; skips (saying so) otherwise.
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::test_support::{chained, desc};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Address;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const HOST_IP: [u8; 4] = [10, 213, 0, 1];
const GUEST_IP: [u8; 4] = [10, 213, 0, 2];

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("virtio-net tests need root (a tap and a network namespace)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("virtio-net tests need /dev/net/tun");
    }
    None
}

/// Runs `body` on a thread in a new network namespace holding tap `shoal-t0` (up, with the
/// host address, and a static neighbour entry for the guest), and a UDP socket on the host
/// address.
fn in_netns<T: Send>(body: impl FnOnce(Tap, UdpSocket) -> T + Send) -> Option<T> {
    if let Some(reason) = skip_reason() {
        println!("SKIP: {reason}");
        return None;
    }
    Some(std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            // No IPv6: its router and multicast chatter would land in the receive buffers.
            for conf in ["all", "default"] {
                let knob = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                if std::path::Path::new(&knob).exists() {
                    std::fs::write(&knob, "1").expect("disable IPv6");
                }
            }
            let tap = Tap::open("shoal-t0", None).expect("open tap");
            let ip = |args: &str| {
                let st = Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .expect("run ip");
                assert!(st.success(), "ip {args}");
            };
            ip("link set lo up");
            ip("addr add 10.213.0.1/24 dev shoal-t0");
            ip("link set shoal-t0 up");
            ip("neigh add 10.213.0.2 lladdr 02:00:00:00:00:02 dev shoal-t0");
            let sock = UdpSocket::bind("10.213.0.1:5000").expect("bind UDP");
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            body(tap, sock)
        })
        .join()
        .unwrap()
    }))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A virtio-net header (no offload) and an Ethernet/IPv4/UDP frame from the guest to the
/// host's port 5000.
fn guest_frame(dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&6000u16.to_be_bytes());
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.extend_from_slice(payload);
    f
}

fn mac_of(name: &str) -> [u8; 6] {
    // /sys shows the namespace it was mounted in, not this thread's: ask `ip`.
    let out = Command::new("ip")
        .args(["-br", "link", "show", name])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    parse_mac(text.split_whitespace().nth(2).unwrap()).unwrap()
}

fn activate(
    net: &mut Net,
    mem: &GuestMemoryMmap,
    rx: &MockSplitQueue<'_, GuestMemoryMmap>,
    tx: &MockSplitQueue<'_, GuestMemoryMmap>,
    features: u64,
) -> EventFd {
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    net.set_driver_features(features);
    net.activate(
        mem.clone(),
        vec![
            rx.create_queue::<Queue>().unwrap(),
            tx.create_queue::<Queue>().unwrap(),
        ],
        Interrupt::new(irq.try_clone().unwrap()),
    )
    .unwrap();
    irq
}

fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    mem.read_obj(q.used_addr().unchecked_add(2)).unwrap()
}

fn used_len(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>, i: u64) -> u32 {
    mem.read_obj(q.used_addr().unchecked_add(4 + 8 * i + 4))
        .unwrap()
}

/// Polls the device's receive path until `n` chains are used (frames travel through the
/// host stack asynchronously).
fn wait_rx(net: &mut Net, mem: &GuestMemoryMmap, rx: &MockSplitQueue<'_, GuestMemoryMmap>, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while used_idx(mem, rx) < n {
        assert!(
            Instant::now() < deadline,
            "no frame reached the guest buffers"
        );
        net.backend_event();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn frames_go_both_ways_between_the_queues_and_a_real_tap() {
    in_netns(|tap, sock| {
        let host_mac = mac_of("shoal-t0");
        let mut net = Net::with_tap(tap, GUEST_MAC, 1500);
        let mut cfg = [0u8; 6];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, GUEST_MAC);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        // Guest → host: the frame split over two descriptors (header, then the rest).
        let frame = guest_frame(host_mac, b"hello from the guest");
        mem.write_slice(&frame[..VNET_HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&frame[VNET_HDR_LEN..], GuestAddress(0x11_0000))
            .unwrap();
        tx.add_desc_chains(
            &[
                chained(0x10_0000, VNET_HDR_LEN as u32, false, 1),
                desc(0x11_0000, (frame.len() - VNET_HDR_LEN) as u32, 0, 0),
            ],
            0,
        )
        .unwrap();
        // One receive buffer, large enough for a full frame (no mergeable buffers).
        rx.add_desc_chains(&[desc(0x20_0000, 2048, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let irq = activate(&mut net, &mem, &rx, &tx, F_CSUM | F_GUEST_CSUM);
        net.queue_notify(TX);
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("the guest's datagram");
        assert_eq!(&buf[..n], b"hello from the guest");
        assert_eq!(from.to_string(), "10.213.0.2:6000");
        assert_eq!(used_idx(&mem, &tx), 1);
        assert!(irq.read().is_ok());
        assert_eq!(net.stats.tx_frames.load(Ordering::Relaxed), 1);

        // Host → guest.
        sock.send_to(b"hello from the host", "10.213.0.2:6000")
            .unwrap();
        wait_rx(&mut net, &mem, &rx, 1);
        let len = used_len(&mem, &rx, 0) as usize;
        let mut got = vec![0u8; len];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..VNET_HDR_LEN + 6], &GUEST_MAC);
        assert!(got.ends_with(b"hello from the host"), "{got:?}");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    });
}

#[test]
fn a_large_frame_spreads_over_mergeable_buffers_and_the_rest_wait() {
    in_netns(|tap, sock| {
        let mut net = Net::with_tap(tap, GUEST_MAC, 1500);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        // Four 512-byte buffers: room for one full-size frame (1530 bytes with header).
        let chains: Vec<_> = (0..4)
            .map(|i| desc(0x20_0000 + i * 0x1000, 512, VRING_DESC_F_WRITE, 0))
            .collect();
        rx.add_desc_chains(&chains, 0).unwrap();
        let _irq = activate(&mut net, &mem, &rx, &tx, F_GUEST_CSUM | F_MRG_RXBUF);
        let payload = vec![0x5a; 1000];
        sock.send_to(&payload, "10.213.0.2:6000").unwrap();
        wait_rx(&mut net, &mem, &rx, 3);
        // 12 + 14 + 20 + 8 + 1000 = 1054 bytes: 512 + 512 + 30, in three buffers.
        assert_eq!(used_idx(&mem, &rx), 3);
        let lens: Vec<_> = (0..3).map(|i| used_len(&mem, &rx, i)).collect();
        assert_eq!(lens, [512, 512, 30]);
        let hdr: [u8; 12] = mem.read_obj(GuestAddress(0x20_0000)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3, "num_buffers");
        let tail: [u8; 30] = mem.read_obj(GuestAddress(0x20_2000)).unwrap();
        assert!(tail.iter().all(|b| *b == 0x5a));
        // The fourth buffer alone cannot hold a full frame: the next frame waits for the
        // guest to post more, and is delivered when it does.
        sock.send_to(b"second", "10.213.0.2:6000").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        net.backend_event();
        assert_eq!(used_idx(&mem, &rx), 3);
        let more: Vec<_> = (0..3)
            .map(|i| desc(0x30_0000 + i * 0x1000, 512, VRING_DESC_F_WRITE, 0))
            .collect();
        rx.add_desc_chains(&more, 4).unwrap();
        net.queue_notify(RX);
        assert_eq!(used_idx(&mem, &rx), 4, "the waiting frame fits one buffer");
        let hdr: [u8; 12] = mem.read_obj(GuestAddress(0x20_3000)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    });
}

#[test]
fn offloads_follow_the_features_the_guest_accepted() {
    assert_eq!(
        Net::tap_offloads(F_GUEST_TSO4),
        0,
        "TSO needs checksum offload"
    );
    assert_eq!(Net::tap_offloads(F_GUEST_CSUM), TUN_F_CSUM);
    assert_eq!(
        Net::tap_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    );
}

#[test]
fn malformed_guest_frames_are_dropped_and_returned() {
    in_netns(|tap, _sock| {
        let mut net = Net::with_tap(tap, GUEST_MAC, 1500);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        // A header and nothing else; a buffer outside guest memory; a device-writable one.
        tx.add_desc_chains(
            &[
                desc(0x10_0000, VNET_HDR_LEN as u32, 0, 0),
                desc(0x7fff_0000, 64, 0, 0),
                desc(0x10_1000, 64, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let _irq = activate(&mut net, &mem, &rx, &tx, 0);
        net.queue_notify(TX);
        assert_eq!(used_idx(&mem, &tx), 3);
        assert_eq!(net.stats.tx_dropped.load(Ordering::Relaxed), 3);
    });
}

#[test]
fn net_arguments_and_bad_taps() {
    let c: NetConfig = "tap0,mac=02:aa:bb:cc:dd:ee,mtu=9000,netns=/run/netns/x"
        .parse()
        .unwrap();
    assert_eq!(c.tap, "tap0");
    assert_eq!(c.mac, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    assert_eq!(c.mtu, 9000);
    assert_eq!(
        c.netns.as_deref(),
        Some(std::path::Path::new("/run/netns/x"))
    );
    let c: NetConfig = "tap1".parse().unwrap();
    assert_eq!((c.mac[0] & 1, c.mac[0] & 2, c.mtu), (0, 2, 1500));
    assert!("tap0,mac=zz".parse::<NetConfig>().is_err());
    assert!("tap0,mtu=20".parse::<NetConfig>().is_err());
    assert!("a-name-that-is-too-long".parse::<NetConfig>().is_err());
    assert!("tap0,color=red".parse::<NetConfig>().is_err());
    assert_eq!(
        format_mac(&[2, 0xaa, 0, 1, 0x10, 0xff]),
        "02:aa:00:01:10:ff"
    );
    let e = Tap::open("x/y", None).unwrap_err().to_string();
    assert!(e.contains("x/y"), "{e}");
    let e = Tap::open("t0", Some(std::path::Path::new("/nonexistent/netns")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/netns") && e.contains("t0"), "{e}");
}

#[test]
fn unusable_receive_buffers_are_returned_empty() {
    in_netns(|tap, sock| {
        let mut net = Net::with_tap(tap, GUEST_MAC, 1500);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        rx.add_desc_chains(
            &[
                // Read-only (not a receive buffer), shorter than the header, outside memory.
                desc(0x20_0000, 512, 0, 0),
                desc(0x20_1000, 8, VRING_DESC_F_WRITE, 0),
                desc(0x7fff_0000, 2048, VRING_DESC_F_WRITE, 0),
                desc(0x20_2000, 2048, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let _irq = activate(&mut net, &mem, &rx, &tx, F_GUEST_CSUM);
        assert_eq!(used_idx(&mem, &rx), 3);
        assert!((0..3).all(|i| used_len(&mem, &rx, i) == 0));
        sock.send_to(b"still works", "10.213.0.2:6000").unwrap();
        wait_rx(&mut net, &mem, &rx, 4);
        let len = used_len(&mem, &rx, 3) as usize;
        let mut got = vec![0u8; len];
        mem.read_slice(&mut got, GuestAddress(0x20_2000)).unwrap();
        assert!(got.ends_with(b"still works"), "{got:?}");
    });
}

#[test]
fn a_ring_smaller_than_the_largest_frame_still_receives() {
    in_netns(|tap, sock| {
        let mut net = Net::with_tap(tap, GUEST_MAC, 1500);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        // Two 512-byte buffers are all the guest can post: far less than a 64 KiB TSO frame.
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 2);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 2);
        rx.add_desc_chains(
            &[
                desc(0x20_0000, 512, VRING_DESC_F_WRITE, 0),
                desc(0x20_1000, 512, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let features = F_GUEST_CSUM | F_GUEST_TSO4 | F_MRG_RXBUF;
        let _irq = activate(&mut net, &mem, &rx, &tx, features);
        // A frame that does not fit is dropped; the next one, small, is delivered.
        sock.send_to(&[7u8; 1400], "10.213.0.2:6000").unwrap();
        sock.send_to(b"small", "10.213.0.2:6000").unwrap();
        wait_rx(&mut net, &mem, &rx, 1);
        assert_eq!(
            net.stats.rx_dropped.load(Ordering::Relaxed),
            1,
            "frames {} used len {}",
            net.stats.rx_frames.load(Ordering::Relaxed),
            used_len(&mem, &rx, 0)
        );
        let len = used_len(&mem, &rx, 0) as usize;
        let mut got = vec![0u8; len];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert!(got.ends_with(b"small"), "{got:?}");
    });
}
