"""Constants shared by the kernels and everything above them: telemetry field layout and id ranges."""

from morpho_dist.lifecycle import NUM_STAGES, Stage

TELEMETRY_FIELDS = ("count", "sum", "sumsq", "dead", "absmax", "grad_sq", "benefit", "delta_sq")
NUM_FIELDS = len(TELEMETRY_FIELDS)
F_COUNT, F_SUM, F_SUMSQ, F_DEAD, F_ABSMAX, F_GRAD_SQ, F_BENEFIT, F_DELTA_SQ = range(NUM_FIELDS)
# absmax reduces with max; every other field with sum.
SUM_FIELDS = tuple(i for i in range(NUM_FIELDS) if i != F_ABSMAX)
MAX_FIELDS = (F_ABSMAX,)

STAGE_ID_RANGE = (0, NUM_STAGES - 1)
BLEND_ID_RANGE = (0, 2)

# Stage ids grouped the way the kernels branch on them (ids are contiguous by design).
TRAINING_ID = int(Stage.TRAINING)
BLENDED_LO, BLENDED_HI = int(Stage.GRAFTING), int(Stage.FOSSILIZED)  # GRAFTING..FOSSILIZED are blended
