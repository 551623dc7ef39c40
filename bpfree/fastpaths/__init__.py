"""Model-specific fast paths: estimator factories registered with `bpfree.methods.register_fast_path` for a
(method, model class) pair, used by `methods.build` in place of the generic rule. Generic method files never
import a model; the modules here do.
"""

from bpfree.fastpaths import ff_mlp, localmixer_feedback, localmixer_local  # noqa: F401
