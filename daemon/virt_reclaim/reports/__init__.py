"""What the commands report without changing anything: plan, inventory, layout cost, advice."""
