"""Head conditions as CapHuman sees them: DECA coefficients → FLAME mesh → normal, albedo and Lambertian
renders (the 9-channel CapFace condition). Entry point: `head_condition.HeadConditionRenderer`."""
