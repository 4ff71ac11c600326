"""The built-in scenario: synthetic victims, clients, attackers and training
batches (``scenario``), and ``run --demo`` playing them (``play``)."""
