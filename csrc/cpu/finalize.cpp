// CPU finalisation of each row (common/margin.h finalize_row), parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../margin_ce.h"

namespace dcq_ops {

void finalize_rows_cpu(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                       at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                       const MarginParams& params) {
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "finalize_rows_cpu", [&] {
    const scalar_t* c = positive_cos.data_ptr<scalar_t>();
    const scalar_t* mx = row_max.data_ptr<scalar_t>();
    const scalar_t* sm = row_sum.data_ptr<scalar_t>();
    scalar_t* out_loss = loss.data_ptr<scalar_t>();
    scalar_t* out_pos = coef_positive.data_ptr<scalar_t>();
    scalar_t* out_neg = coef_negative.data_ptr<scalar_t>();
    at::parallel_for(0, positive_cos.size(0), 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        finalize_row<scalar_t>(c[i], mx[i], sm[i], params, &out_loss[i], &out_pos[i], &out_neg[i]);
      }
    });
  });
}

}  // namespace dcq_ops
