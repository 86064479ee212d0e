// The two GEMMs of a CPU queue-pass tile, and the choice of who computes them:
// ATen's BLAS (MKL in torch's x86 builds), or the package's own AVX-512
// kernels (tile_gemm_kernels.h). MKL runs its AVX2 kernels on AMD processors
// and wherever MKL_ENABLE_INSTRUCTIONS limits it, at about 0.6 of what the
// machine can do; in the queue pass the own kernels run as fast as MKL's
// AVX-512 ones or faster, wherever AVX-512 exists. Which is faster is
// measured, once per process, on the first fp32 queue pass (or named by
// DCQ_OPS_CPU_GEMM).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace dcq_ops {

enum class GemmProvider { kAten, kAvx512 };

const char* provider_name(GemmProvider provider);

// The provider of this process's fp32 tiles. On first call: DCQ_OPS_CPU_GEMM
// ("aten", "avx512"; "auto" or unset: the probe), else the faster of the
// available providers on probe tiles (the own kernels unless ATen's BLAS is
// more than 5% faster: see kOwnKernelMargin).
GemmProvider cpu_gemm_provider();
// The providers this CPU can run ("aten" always; "avx512" when the CPU and
// ATen's capability have AVX-512, as for the epilogue).
std::vector<std::string> available_cpu_gemm_providers();
// Replaces the choice (benchmarks compare providers in one process; tests run
// each). Throws for an unknown or unavailable name.
void set_cpu_gemm_provider(const std::string& name);
// The probe's single-thread GFLOP/s per provider; empty when none ran.
std::vector<std::pair<std::string, double>> cpu_gemm_probe();

// One thread's tile GEMMs (float or double; double always through ATen).
// Holds the thread's packing scratch, and keeps MKL to this thread while it lives.
class TileGemm {
 public:
  TileGemm(GemmProvider provider, int64_t dim);
  ~TileGemm();
  TileGemm(const TileGemm&) = delete;
  TileGemm& operator=(const TileGemm&) = delete;

  // logits [rows, cols] = q [rows, dim] . chunk [cols, dim]^T
  void logits(const at::Tensor& q, const at::Tensor& chunk, const at::Tensor& logits);
  // acc [rows, dim] += p [rows, cols] . chunk [cols, dim]
  void accumulate(const at::Tensor& acc, const at::Tensor& p, const at::Tensor& chunk);

  // Queue slots per chunk for this provider, for tiles of `block_rows` rows of
  // `dim` elements of `element_size` bytes (64 to cpu_kernels::kMaxCols).
  static int64_t chunk_width(GemmProvider provider, int64_t block_rows, int64_t dim, int64_t element_size);

 private:
  bool own_kernel_takes(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) const;

  GemmProvider provider_;
  std::vector<float> scratch_storage_;
  float* scratch_ = nullptr;  // scratch_storage_ from its first 64-byte boundary
  int previous_blas_threads_ = 0;
};

}  // namespace dcq_ops
