"""Build hook: editable installs (``pip install -e``) get the lm-eval start-up hook too.

Hatchling's ``force-include`` applies to regular wheels only; an editable wheel needs
``force_include_editable``. See minikv/harness/__init__.py for what the hook does.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HOOK_FILES = {"_minikv_lm_eval.py": "_minikv_lm_eval.py", "minikv_lm_eval.pth": "minikv_lm_eval.pth"}


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "editable":
            build_data["force_include_editable"] = dict(HOOK_FILES)
