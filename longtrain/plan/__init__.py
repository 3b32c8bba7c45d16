"""Planning before running: hardware profiles, the closed-form cost model and the plan search (`longtrain plan`)."""
