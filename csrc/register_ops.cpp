#include "schemas.h"

TORCH_LIBRARY(bayesdiff_ext, m) { bdx::define_schemas(m); }
