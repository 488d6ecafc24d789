//! Block transfer between two Ferry network loops on 127.0.0.1: round-trip latency and
//! throughput of `/ferry/block/1` with 1 MiB blocks, 1, 16 and 64 requests in flight,
//! over TCP+TLS+Yamux (and QUIC for comparison). mDNS is off.
//!
//! `cargo bench --bench net` (release). `FERRY_BENCH_MIB` sets the MiB moved per
//! throughput run (default 512). The responder serves one block from memory, so the
//! figures are the network path alone: no disk, no hashing. CPU-s/GiB (both peers, as
//! they share this process) is the figure to trust on a busy machine; MB/s is not.
//! `FERRY_BENCH_NET=tcp` (or `quic`) runs one transport only. Over TCP, blocks over 64 KiB
//! go on the block lane; `FERRY_BENCH_LANES=0` sends them through libp2p's muxer instead.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ferry::{
    net::{self, NetConfig, NetEvent, NetHandle, PeerEntry},
    protocol::{BlockRequest, BlockResponse, MAX_BLOCK_SIZE},
    types::DeviceId,
};
use libp2p::{identity::Keypair, Multiaddr};
use tokio::sync::{mpsc, Semaphore};

async fn node(listen: &str, block: Arc<Vec<u8>>) -> (NetHandle, Multiaddr, mpsc::Receiver<()>) {
    let cfg = NetConfig {
        keypair: Keypair::generate_ed25519(),
        listen: vec![listen.parse().expect("multiaddr")],
        mdns: false,
        lanes: std::env::var("FERRY_BENCH_LANES").map_or(true, |v| v != "0"),
    };
    let (h, mut events) = net::start(cfg).await.expect("start");
    let addr = h.listen_addrs().await.expect("addrs")[0].clone();
    let (connected_tx, connected_rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                NetEvent::Connected { .. } => {
                    let _ = connected_tx.try_send(());
                }
                NetEvent::BlockRequest { req, reply, .. } => {
                    let n = (req.size as usize).min(block.len());
                    let _ = reply.send(BlockResponse::Data(block[..n].to_vec()));
                }
                // Blocks of 64 KiB or less travel in batches (`/ferry/blocks/1`).
                NetEvent::BlockBatch { reqs, reply, .. } => {
                    let data = reqs
                        .iter()
                        .map(|r| {
                            let n = (r.size as usize).min(block.len());
                            BlockResponse::Data(block[..n].to_vec())
                        })
                        .collect();
                    let _ = reply.send(data);
                }
                _ => {}
            }
        }
    });
    (h, addr, connected_rx)
}

fn req(size: u32, i: u64) -> BlockRequest {
    BlockRequest {
        folder: "bench".into(),
        name: "file.bin".into(),
        offset: i * u64::from(size),
        size,
        hash: [0; 32],
    }
}

async fn pair(listen: &str) -> (NetHandle, NetHandle, DeviceId) {
    let block = Arc::new(vec![0x5a; MAX_BLOCK_SIZE as usize]);
    let (a, _, mut a_conn) = node(listen, block.clone()).await;
    let (b, b_addr, _) = node(listen, block).await;
    a.set_peers(vec![PeerEntry {
        id: b.local_id(),
        addrs: vec![b_addr],
    }])
    .await
    .expect("peers");
    b.set_peers(vec![PeerEntry {
        id: a.local_id(),
        addrs: vec![],
    }])
    .await
    .expect("peers");
    tokio::time::timeout(Duration::from_secs(10), a_conn.recv())
        .await
        .expect("connect within 10 s");
    let bid = b.local_id();
    (a, b, bid)
}

async fn latency(a: &NetHandle, peer: DeviceId, size: u32, rounds: u64) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(rounds as usize);
    for i in 0..rounds {
        let t = Instant::now();
        match a.request_block(peer, req(size, i)).await.expect("block") {
            BlockResponse::Data(d) => assert_eq!(d.len(), size as usize),
            other => panic!("unexpected {other:?}"),
        }
        times.push(t.elapsed());
    }
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

/// CPU time (user + system) this process has used so far, both peers included.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// MB/s and CPU seconds per GiB (both peers) moving `mib` MiB in blocks of `size` bytes.
async fn throughput(
    a: &NetHandle,
    peer: DeviceId,
    in_flight: usize,
    mib: u64,
    size: u32,
) -> (f64, f64) {
    let permits = Arc::new(Semaphore::new(in_flight));
    let cpu0 = cpu_time();
    let t = Instant::now();
    let blocks = mib * 1024 * 1024 / u64::from(size);
    let mut tasks = Vec::with_capacity(blocks as usize);
    for i in 0..blocks {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let r = a.request_block(peer, req(size, i)).await;
            drop(permit);
            matches!(r, Ok(BlockResponse::Data(d)) if d.len() == size as usize)
        }));
    }
    for task in tasks {
        assert!(task.await.expect("task"), "a block failed");
    }
    let mbs = (blocks * u64::from(size)) as f64 / t.elapsed().as_secs_f64() / 1e6;
    let cpu_per_gib = (cpu_time() - cpu0).as_secs_f64() * 1024.0 / mib as f64;
    (mbs, cpu_per_gib)
}

async fn run(label: &str, listen: &str, mib: u64) {
    let (a, b, peer) = pair(listen).await;
    let (p50, p99) = latency(&a, peer, 4096, 500).await;
    println!("{label}: 4 KiB block round trip   p50 {p50:>9.1?}  p99 {p99:>9.1?}");
    let (p50, p99) = latency(&a, peer, MAX_BLOCK_SIZE, 64).await;
    println!("{label}: 1 MiB block round trip   p50 {p50:>9.1?}  p99 {p99:>9.1?}");
    for in_flight in [1, 16, 64] {
        let (mbs, cpu) = throughput(&a, peer, in_flight, mib, MAX_BLOCK_SIZE).await;
        println!(
            "{label}: 1 MiB blocks, {in_flight:>2} in flight: {mbs:>7.0} MB/s, \
             {cpu:.2} CPU-s/GiB ({mib} MiB)"
        );
    }
    // FastCDC's average chunk: what a large file's pull mostly asks for.
    let (mbs, cpu) = throughput(&a, peer, 16, mib, 256 * 1024).await;
    println!(
        "{label}: 256 KiB blocks, 16 in flight: {mbs:>7.0} MB/s, {cpu:.2} CPU-s/GiB ({mib} MiB)"
    );
    let stats = a.peer_stats().await.expect("stats");
    println!(
        "{label}: bytes counted at the requester: in {} MiB, out {} KiB",
        stats[0].bytes_in >> 20,
        stats[0].bytes_out >> 10
    );
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}

fn main() {
    let mib: u64 = std::env::var("FERRY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // `FERRY_BENCH_NET=tcp` or `quic`: that transport only (one profile per transport).
    let only = std::env::var("FERRY_BENCH_NET").ok();
    let wanted = |t: &str| only.as_deref().is_none_or(|o| o == t);
    rt.block_on(async {
        if wanted("tcp") {
            run("tcp ", "/ip4/127.0.0.1/tcp/0", mib).await;
        }
        if wanted("quic") {
            run("quic", "/ip4/127.0.0.1/udp/0/quic-v1", mib).await;
        }
    });
}
