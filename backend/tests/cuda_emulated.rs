//! The CUDA device end to end on a machine without a GPU, on an emulated one: every
//! operation of the `Device` trait on `CudaDevice` against the CPU (`test_tools::device_check`),
//! through cudarc, the real kernels and the real NVRTC, with only the driver and cuBLAS faked.
//!
//! `tests/emulated_gpu/` holds a fake `libcuda.so`, which runs the kernel sources of
//! `backend/kernels/` compiled as C++ (each GPU thread a fiber, so threads interleave at
//! barriers as on the GPU), and a fake `libcublas.so` with a plain SGEMM; see the comments
//! there. The test builds both with g++, then runs itself again in a child process with
//! them first on `LD_LIBRARY_PATH` (cudarc opens the libraries by name, and the loader reads
//! that variable once, at start-up). In the child, `CudaDevice::new` compiles the kernels
//! with NVRTC for the emulated GPU's architecture and "loads" the machine code, and the
//! harness compares every operation with the CPU's.
//!
//! Then the server itself: `sluice-backend --device cuda:0` on the emulated GPU serves
//! MiniLM's embeddings, equal to the CPU's to rounding.
//!
//! Needs g++ and NVRTC (scripts/test.sh puts the latter on LD_LIBRARY_PATH); without either
//! the test says so and passes, except under `CI=true`, where it fails.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_backend::device::cpu::Cpu;
use sluice_backend::device::cuda::CudaDevice;
use sluice_backend::device::Device;
use sluice_backend::device::Target;
use sluice_backend::engine::EmbeddingModel;
use sluice_backend::engine::ModelInput;
use sluice_backend::model::bert::cosine;
use sluice_backend::test_tools::device_check;

/// This test's name: the child runs exactly it.
const TEST: &str = "cuda_device_matches_the_cpu_on_an_emulated_gpu";
/// Set in the child, which runs on the emulated GPU.
const CHILD: &str = "SLUICE_EMULATED_GPU_CHILD";
const SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/emulated_gpu");
/// IEEE f32 without contraction, as the kernels are compiled for the GPU.
const FLAGS: [&str; 6] = [
    "-O2",
    "-shared",
    "-fPIC",
    "-ffp-contract=off",
    "-std=c++17",
    "-pthread",
];
/// Far above the few seconds the child takes, to end a hang rather than wait for it.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

fn gxx_present() -> bool {
    let found = Command::new("g++")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    common::present(
        found,
        "no g++ to build the emulated GPU with (the build-essential package)",
    )
}

/// Starts g++ building `library` in `dir` from `sources` in tests/emulated_gpu/.
fn start_gxx(dir: &Path, library: &str, sources: &[&str], extra: &[&str]) -> Child {
    Command::new("g++")
        .args(FLAGS)
        .args(extra)
        .arg("-o")
        .arg(dir.join(library))
        .args(sources.iter().map(|s| Path::new(SOURCES).join(s)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting g++")
}

/// The fake libcuda.so (also as libcuda.so.1, its soname) and libcublas.so, in `dir`.
fn build_emulated_gpu(dir: &Path) {
    let builds = [
        start_gxx(
            dir,
            "libcuda.so",
            &["driver.cpp", "fibers.cpp", "kernels.cpp"],
            &["-Wl,-soname,libcuda.so.1"],
        ),
        start_gxx(dir, "libcublas.so", &["cublas.cpp"], &[]),
    ];
    for build in builds {
        let output = build.wait_with_output().expect("running g++");
        assert!(
            output.status.success(),
            "g++ failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::os::unix::fs::symlink("libcuda.so", dir.join("libcuda.so.1")).unwrap();
}

#[test]
fn cuda_device_matches_the_cpu_on_an_emulated_gpu() {
    if std::env::var_os(CHILD).is_some() {
        return on_the_emulated_gpu();
    }
    if !common::nvrtc_present() || !gxx_present() {
        return;
    }
    let started = Instant::now();
    // Under the target folder rather than /tmp, which may be mounted noexec.
    let dir = tempfile::Builder::new()
        .prefix("emulated-gpu-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    build_emulated_gpu(dir.path());
    let built = started.elapsed();

    // LD_LIBRARY_PATH already holds NVRTC's folder; the fakes go first.
    let library_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(rest) if !rest.is_empty() => format!("{}:{rest}", dir.path().display()),
        _ => dir.path().display().to_string(),
    };
    // Output to files, not pipes, so that a child writing a lot never blocks on them.
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", &library_path)
        .env("SLUICE_KERNEL_CACHE", dir.path().join("kernels"))
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    println!("{stdout}\n{stderr}");
    println!(
        "built the emulated GPU in {:.1} s; the child took {:.1} s",
        built.as_secs_f64(),
        (started.elapsed() - built).as_secs_f64()
    );
    let status = status.unwrap_or_else(|| panic!("the child ran past {CHILD_TIMEOUT:?}"));
    assert!(status.success(), "the child failed: {status}");
    // A filter that matched nothing would pass too: make sure the test itself ran.
    assert!(stdout.contains("1 passed"), "the child ran no test");

    if let Some(folder) = common::minilm_folder() {
        serves_embeddings_from_the_emulated_gpu(dir.path(), &library_path, &folder);
    }
}

/// Kills the server when the test ends, passing or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sluice-backend --device cuda:0`, with the fake driver first on its library path, serves
/// MiniLM: `/v1/models` says `cuda:0`, and its embeddings are the CPU's to rounding.
fn serves_embeddings_from_the_emulated_gpu(dir: &Path, library_path: &str, minilm: &Path) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let log = dir.join("backend.log");
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_sluice-backend"))
            .args(["--engine", "native", "--device", "cuda:0"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--model")
            .arg(format!("all-MiniLM-L6-v2={}", minilm.display()))
            .env("LD_LIBRARY_PATH", library_path)
            .env("SLUICE_KERNEL_CACHE", dir.join("kernels"))
            .stdout(File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let texts = [
        "The cat sat on the mat.",
        "How do I reset my password?",
        "Paris is the capital of France.",
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (device, served) = runtime.block_on(async {
        let client = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let health = client.get(format!("{base}/health")).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if let Some(status) = server.0.try_wait().unwrap() {
                panic!(
                    "the server exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let models: serde_json::Value = client
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let reply: serde_json::Value = client
            .post(format!("{base}/v1/embeddings"))
            .json(&serde_json::json!({"model": "all-MiniLM-L6-v2", "input": texts}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let served: Vec<Vec<f32>> = reply["data"]
            .as_array()
            .unwrap_or_else(|| panic!("{reply}"))
            .iter()
            .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
            .collect();
        (models["data"][0]["device"].clone(), served)
    });
    assert_eq!(device, "cuda:0");
    let cpu = EmbeddingModel::load("all-MiniLM-L6-v2", minilm, Target::Cpu).unwrap();
    let inputs = texts
        .iter()
        .map(|t| ModelInput::Text((*t).to_owned()))
        .collect();
    let expected = runtime.block_on(cpu.embed(inputs)).unwrap().vectors;
    assert_eq!(served.len(), expected.len());
    for ((text, got), want) in texts.iter().zip(&served).zip(&expected) {
        let cosine = cosine(got, want);
        println!("{text:?}: cosine {cosine:.9} against the CPU");
        assert!(cosine >= 0.99999, "{text:?}: cosine {cosine}");
    }
}

/// In the child: the CUDA device on the emulated GPU against the CPU.
fn on_the_emulated_gpu() {
    let device = CudaDevice::new(0).unwrap_or_else(|err| panic!("{err}"));
    let gpu = device.gpu();
    println!(
        "{} (compute capability {:?}, kernels for {})",
        gpu.name,
        gpu.compute_capability,
        gpu.arch()
    );
    // This process must not have found a real driver instead.
    assert!(gpu.name.starts_with("Emulated GPU"), "{gpu:?}");
    assert!(device.free_memory().is_some_and(|free| free > 0));

    let started = Instant::now();
    let results = device_check::compare(&Cpu, &device, 7).unwrap_or_else(|err| panic!("{err}"));
    for c in &results {
        println!(
            "{:<64} error {:.1e} (tolerance {:.0e}){}",
            c.op,
            c.error,
            c.tolerance,
            if c.passed() { "" } else { "  FAILED" }
        );
    }
    println!(
        "{} operations compared in {:.1} s",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&str> = results
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.op.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "the CUDA device differs from the CPU: {failed:?}"
    );

    device.synchronize().unwrap();
}
