// Who computes the tile GEMMs of the CPU queue pass (see tile_gemm.h).
#include "tile_gemm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#include <unistd.h>

#include <c10/util/StringUtil.h>

#include "epilogue.h"
#include "epilogue_kernels.h"
#include "tile_gemm_kernels.h"

// MKL (torch's BLAS on x86) parallelises a GEMM even when it is called inside
// the queue pass's parallel region: threads nested in threads, spinning against
// each other and against any other load on the machine (measured: 10x slower
// while a second process keeps one of two cores busy). A task's GEMMs belong to
// its thread alone, so they get one MKL thread. The symbol is weak: other BLAS
// (OpenBLAS detects the parallel region itself) simply lack it.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace dcq_ops {
namespace {

constexpr const char* kEnv = "DCQ_OPS_CPU_GEMM";
// The own kernels are chosen unless ATen's BLAS beats them on the probe by more
// than 5%: in the whole queue pass they ran 0-8% faster than MKL's AVX-512
// kernels where the probe had them only 4-7% ahead (a one-thread probe on hot
// tiles does not see the packing shared by the two GEMMs of a chunk), and the
// margin keeps a call close to even from flipping between processes.
constexpr double kOwnKernelMargin = 0.95;

bool avx512_available() { return std::string(cpu_capability()) == "avx512"; }

GemmProvider parse(const std::string& name, const char* origin) {
  if (name == "aten") return GemmProvider::kAten;
  if (name == "avx512") {
    TORCH_CHECK(avx512_available(), origin, "avx512: this CPU (or ATEN_CPU_CAPABILITY) has no AVX-512; available: ",
                c10::Join(", ", available_cpu_gemm_providers()));
    return GemmProvider::kAvx512;
  }
  TORCH_CHECK(false, origin, name, ": unknown CPU GEMM provider; expected auto, ",
              c10::Join(", ", available_cpu_gemm_providers()));
}

// The per-core L2 cache, which should hold a tile of logits and its chunk of
// the queue (the fallback covers machines that do not report it).
int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{1} << 20;
  }();
  return bytes;
}

std::mutex probe_mutex;
std::vector<std::pair<std::string, double>> probe_rates;  // GFLOP/s, guarded by probe_mutex

// GFLOP/s of one thread through `provider`, best of five tile pairs (logits,
// then the accumulation) after two warm-up pairs, on the tiles the queue pass
// gives it most: 256 rows, D = 512, the provider's chunk width on this CPU.
double probe_rate(GemmProvider provider) {
  constexpr int64_t rows = 256, dim = 512;
  const int64_t cols = TileGemm::chunk_width(provider, rows, dim, sizeof(float));
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // Deterministic inputs (no generator state is consumed); probabilities in [0, 1).
  const at::Tensor q = at::sin(at::arange(rows * dim, opts)).view({rows, dim});
  const at::Tensor w = at::cos(at::arange(cols * dim, opts)).view({cols, dim});
  const at::Tensor p = at::sin(at::arange(rows * cols, opts)).abs_().view({rows, cols});
  const at::Tensor logits = at::empty({rows, cols}, opts);
  const at::Tensor acc = at::zeros({rows, dim}, opts);
  TileGemm gemm(provider, dim);
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    gemm.logits(q, w, logits);
    gemm.accumulate(acc, p, w);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (rep >= 2) best = std::min(best, seconds);
  }
  return 4.0 * rows * cols * dim / best / 1e9;
}

GemmProvider choose() {
  const char* env = std::getenv(kEnv);
  const std::string requested = env == nullptr ? "" : env;
  if (!requested.empty() && requested != "auto") return parse(requested, "DCQ_OPS_CPU_GEMM=");
  if (!avx512_available()) return GemmProvider::kAten;
  const double aten = probe_rate(GemmProvider::kAten);
  const double own = probe_rate(GemmProvider::kAvx512);
  {
    std::lock_guard<std::mutex> lock(probe_mutex);
    probe_rates = {{"aten", aten}, {"avx512", own}};
  }
  return own >= kOwnKernelMargin * aten ? GemmProvider::kAvx512 : GemmProvider::kAten;
}

std::once_flag chosen_once;
std::atomic<int> chosen{static_cast<int>(GemmProvider::kAten)};

}  // namespace

const char* provider_name(GemmProvider provider) { return provider == GemmProvider::kAvx512 ? "avx512" : "aten"; }

GemmProvider cpu_gemm_provider() {
  std::call_once(chosen_once, [] { chosen.store(static_cast<int>(choose())); });
  return static_cast<GemmProvider>(chosen.load());
}

std::vector<std::string> available_cpu_gemm_providers() {
  std::vector<std::string> names{"aten"};
  if (avx512_available()) names.emplace_back("avx512");
  return names;
}

void set_cpu_gemm_provider(const std::string& name) {
  const GemmProvider provider = parse(name, "set_cpu_gemm_provider: ");
  std::call_once(chosen_once, [] {});  // an explicit choice: no probe
  chosen.store(static_cast<int>(provider));
}

std::vector<std::pair<std::string, double>> cpu_gemm_probe() {
  std::lock_guard<std::mutex> lock(probe_mutex);
  return probe_rates;
}

TileGemm::TileGemm(GemmProvider provider, int64_t dim) : provider_(provider) {
  if (provider_ == GemmProvider::kAvx512) {
    // The packed panels start on a cache line: every 64-byte load of the
    // register block is then one line, not two (measured: 5-9% of the GEMMs).
    scratch_storage_.resize(cpu_kernels::tile_gemm_scratch_floats(dim) + 16);
    const auto address = reinterpret_cast<std::uintptr_t>(scratch_storage_.data());
    scratch_ = scratch_storage_.data() + ((64 - address % 64) % 64) / sizeof(float);
  }
  if (MKL_Set_Num_Threads_Local != nullptr) previous_blas_threads_ = MKL_Set_Num_Threads_Local(1);
}

TileGemm::~TileGemm() {
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_blas_threads_);
}

// The fitting width: half the L2 for the logits tile [block_rows, chunk] and
// the queue chunk [chunk, dim], so both stay in the core's cache between the
// two GEMMs. The own kernels are built around it, in whole 64-slot panels (a
// partial panel costs a whole one). MKL packs its operands itself and runs
// wider fp32 tiles faster even past the L2 (measured, 2 MiB L2, 256 rows,
// D = 512, fwd+bwd at K = 10^5: 1024 slots 4-5% faster than the fitting 320,
// 2048 no faster still), so fp32 tiles through ATen are at least 1024 wide.
int64_t TileGemm::chunk_width(GemmProvider provider, int64_t block_rows, int64_t dim, int64_t element_size) {
  const int64_t cache_fit = (l2_cache_bytes() / 2) / ((block_rows + dim) * element_size);
  int64_t width = cache_fit / 16 * 16;
  if (provider == GemmProvider::kAvx512) {
    width = cache_fit / 64 * 64;
  } else if (element_size == sizeof(float)) {
    width = std::max<int64_t>(width, 1024);
  }
  // At least one panel; at most what the vectorised epilogues take.
  return std::clamp<int64_t>(width, 64, cpu_kernels::kMaxCols);
}

// The own kernels take fp32 operands whose rows are contiguous (any row stride).
bool TileGemm::own_kernel_takes(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) const {
  if (provider_ != GemmProvider::kAvx512) return false;
  for (const at::Tensor* t : {&a, &b, &out}) {
    if (t->scalar_type() != at::kFloat || (t->size(1) > 1 && t->stride(1) != 1)) return false;
  }
  return true;
}

void TileGemm::logits(const at::Tensor& q, const at::Tensor& chunk, const at::Tensor& logits) {
#if defined(__x86_64__) || defined(_M_X64)
  if (own_kernel_takes(q, chunk, logits)) {
    return cpu_kernels::tile_logits_avx512(q.size(0), chunk.size(0), q.size(1), q.data_ptr<float>(), q.stride(0),
                                           chunk.data_ptr<float>(), chunk.stride(0), logits.data_ptr<float>(),
                                           logits.stride(0), scratch_);
  }
#endif
  at::Tensor out = logits;
  at::mm_out(out, q, chunk.t());
}

void TileGemm::accumulate(const at::Tensor& acc, const at::Tensor& p, const at::Tensor& chunk) {
#if defined(__x86_64__) || defined(_M_X64)
  if (own_kernel_takes(p, chunk, acc)) {
    return cpu_kernels::tile_accumulate_avx512(p.size(0), p.size(1), acc.size(1), p.data_ptr<float>(), p.stride(0),
                                               chunk.data_ptr<float>(), chunk.stride(0), acc.data_ptr<float>(),
                                               acc.stride(0), scratch_);
  }
#endif
  at::Tensor out = acc;
  out.addmm_(p, chunk);
}

}  // namespace dcq_ops
