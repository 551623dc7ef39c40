"""Running a rule: the training loop and run folders, recipes and the lr finder, data-parallel and staged
(block-parallel) processes, transfer from a trained backbone, and the checks shared by the commands."""
