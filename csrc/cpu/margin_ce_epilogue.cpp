// CPU epilogue of one queue chunk and the per-row finalisation, parallel over rows.
#include <ATen/Parallel.h>

#include <cmath>

#include "../margin_ce.h"

namespace dcq_ops {

void chunk_epilogue_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& chunk_labels,
                        at::Tensor& row_max, at::Tensor& row_sum, at::Tensor& rescale, const MarginParams& p) {
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  float* lg = logits.data_ptr<float>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t* qy = chunk_labels.data_ptr<int64_t>();
  float* mx = row_max.data_ptr<float>();
  float* sm = row_sum.data_ptr<float>();
  float* rs = rescale.data_ptr<float>();

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = lg + i * cols;
      const int64_t label = y[i];
      // Pass 1: max of the kept logits (excluded entries do not count).
      float chunk_max = -INFINITY;
      for (int64_t j = 0; j < cols; ++j) {
        if (is_excluded(label, qy[j])) continue;
        bool filtered;
        chunk_max = std::fmax(chunk_max, negative_logit(row[j], p, &filtered));
      }
      const float new_max = std::fmax(mx[i], chunk_max);
      const float alpha = rescale_factor(mx[i], new_max);
      // Pass 2: exp(z - new_max) into the sum; into the row only for entries
      // that carry a gradient (filtered entries count in the sum but not there).
      float sum = 0.f;
      for (int64_t j = 0; j < cols; ++j) {
        if (is_excluded(label, qy[j])) {
          row[j] = 0.f;
          continue;
        }
        bool filtered;
        const float e = std::exp(negative_logit(row[j], p, &filtered) - new_max);
        sum += e;
        row[j] = filtered ? 0.f : e;
      }
      mx[i] = new_max;
      sm[i] = sm[i] * alpha + sum;
      rs[i] = alpha;
    }
  });
}

void finalize_rows_cpu(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                       at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                       const MarginParams& p) {
  const float* c = positive_cos.data_ptr<float>();
  const float* mx = row_max.data_ptr<float>();
  const float* sm = row_sum.data_ptr<float>();
  float* out_loss = loss.data_ptr<float>();
  float* out_pos = coef_positive.data_ptr<float>();
  float* out_neg = coef_negative.data_ptr<float>();
  at::parallel_for(0, positive_cos.size(0), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const RowResult r = finalize_row(c[i], mx[i], sm[i], p);
      out_loss[i] = r.loss;
      out_pos[i] = r.coef_positive;
      out_neg[i] = r.coef_negative;
    }
  });
}

}  // namespace dcq_ops
