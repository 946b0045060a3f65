#include "glue/conv_geometry.h"

#include <c10/util/Exception.h>

namespace bdx::glue {

void check_pair(at::IntArrayRef values, const char* op, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, op, ": `", name, "` must have 2 entries (height, width), got ", values);
  TORCH_CHECK(values[0] >= minimum && values[1] >= minimum, op, ": `", name, "` must be >= ", minimum, ", got ",
              values);
}

}  // namespace bdx::glue
